"""The service's own Engine behind two other servers, for benchmarks/peers.py. Both take the
JSON body of our /predict (``{"images": ["<base64>"], "top_k": k}``, one image) and answer the
same shape; HALO_* variables configure the Engine as they configure the service.

    python -m benchmarks.peer_servers litserve --port 8101   # LitServe: its batching loop, one worker
    python -m benchmarks.peer_servers naive --port 8102      # FastAPI, one forward per request
"""
import argparse
import base64
from typing import List, Tuple

import litserve as ls
import torch
from torch import Tensor

from app.config import Settings
from app.engine import Engine


def decode(engine: Engine, body: dict) -> Tuple[Tensor, int]:
    return engine.decode(base64.b64decode(body["images"][0])), int(body.get("top_k", 5))


def answer(engine: Engine, probs: Tensor, top_k: int) -> dict:
    return {"model": engine.name, "results": [{"predictions": engine.top_k(probs, top_k)}]}


class HaloNetLitAPI(ls.LitAPI):
    """LitServe's batching (max batch and window as our service's), our decode, forward and top-k.
    At module level: LitServe pickles it into its worker process."""

    def __init__(self, settings: Settings):
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.max_wait_ms / 1000)
        self.settings = settings

    def setup(self, device: str) -> None:
        self.engine = Engine(self.settings)
        self.engine.warmup()

    def decode_request(self, request: dict) -> Tuple[Tensor, int]:
        return decode(self.engine, request)

    def batch(self, inputs: List[Tuple[Tensor, int]]) -> Tuple[Tensor, List[int]]:
        return torch.stack([x for x, _ in inputs]), [k for _, k in inputs]

    def predict(self, batch: Tuple[Tensor, List[int]]) -> Tuple[Tensor, List[int]]:
        x, top_ks = batch
        return self.engine.forward(x, [None] * len(x))[0], top_ks

    def unbatch(self, output: Tuple[Tensor, List[int]]) -> List[Tuple[Tensor, int]]:
        probs, top_ks = output
        return list(zip(probs, top_ks))

    def encode_response(self, output: Tuple[Tensor, int]) -> dict:
        return answer(self.engine, *output)


def serve_litserve(port: int, settings: Settings) -> None:
    server = ls.LitServer(HaloNetLitAPI(settings), accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def serve_naive(port: int, settings: Settings) -> None:
    import uvicorn
    from fastapi import FastAPI

    engine = Engine(settings)
    engine.warmup()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict) -> dict:  # a plain def: FastAPI's thread pool runs requests side by side
        x, top_k = decode(engine, body)
        return answer(engine, engine.forward(x.unsqueeze(0), [None])[0][0], top_k)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", choices=["litserve", "naive"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    {"litserve": serve_litserve, "naive": serve_naive}[args.server](args.port, Settings())


if __name__ == "__main__":
    main()
