"""A closed-loop client: N simulated clients, each with its own connection, sending one
single-image /predict request after another; throughput and latency percentiles.

In-process (``drive``, for benchmarks/service.py) or as a process of its own, so that a benchmark
of several servers gives each the same client (benchmarks/peers.py):

    python -m benchmarks.closed_loop --url http://127.0.0.1:8000 --clients 32 --seconds 10 --body json
"""
import argparse
import asyncio
import base64
import gc
import io
import json
import time
from typing import Dict, List, Tuple

import httpx
import numpy as np
from PIL import Image

from model.fashion_mnist import load_split


def request_kwargs(image: bytes, body: str) -> Dict:
    """httpx arguments of one request: multipart (``file``, options in the query) or JSON base64."""
    if body == "json":
        return dict(url="/predict", json={"images": [base64.b64encode(image).decode()], "top_k": 1})
    return dict(url="/predict?top_k=1", files=[("file", ("x.png", image))])


async def drive(url: str, concurrency: int, seconds: float, images: List[bytes], body: str = "multipart",
                warmup: float = 0.0) -> Dict[str, float]:
    """``concurrency`` clients for ``warmup`` + ``seconds``. Throughput counts the answers that come
    in the last ``seconds``; latency and errors, the requests sent in them. Requests sent during
    the warm-up are left out: at 64 clients some of the connections' first requests came back
    seconds late, with every server alike, and set p99."""
    # The client's own full garbage collections (of torch, loaded for the dataset, and httpx: 115-185
    # ms, once per 12 s run at 32 clients) stalled every connection at once and set every server's
    # p99 alike: what this process holds from before the run is moved out of the collector's sight.
    gc.collect()
    gc.freeze()
    done: List[Tuple[float, float, float, bool]] = []  # (sent at, answered at, latency, answered 200)
    measure_from = time.monotonic() + warmup
    stop_at = measure_from + seconds
    requests = [request_kwargs(image, body) for image in images]

    # One AsyncClient (one keep-alive connection) per simulated client, as independent users would
    # be: a single client's shared pool costs CPU that grows with the number of requests that
    # complete together, which is what batching makes them do, and the benchmark shares the cores.
    async def one_client(index: int) -> None:
        i = index
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.monotonic() < stop_at:
                sent, started = time.monotonic(), time.perf_counter()
                response = await client.post(**requests[i % len(requests)])
                done.append((sent, time.monotonic(), time.perf_counter() - started, response.status_code == 200))
                i += 1

    clients = asyncio.gather(*(one_client(i) for i in range(concurrency)))
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_from = time.process_time()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    client_cpu = time.process_time() - cpu_from
    await clients
    answered = sum(1 for _, at, _, ok in done if ok and measure_from <= at <= stop_at)
    sent = [(latency, ok) for at, _, latency, ok in done if measure_from <= at < stop_at]
    latencies = [latency for latency, ok in sent if ok]
    quantiles = np.percentile(latencies, [50, 95, 99]) * 1e3 if latencies else [float("nan")] * 3
    return dict(concurrency=concurrency, images_per_s=answered / seconds, p50_ms=float(quantiles[0]),
                p95_ms=float(quantiles[1]), p99_ms=float(quantiles[2]), requests=answered,
                errors=len(sent) - len(latencies), client_cpu_ms_per_request=client_cpu / max(answered, 1) * 1e3)


def fashion_pngs(count: int = 64) -> List[bytes]:
    """The first ``count`` Fashion-MNIST test images as PNG files (Debian's dataset-fashion-mnist)."""
    images, _ = load_split("test")
    pngs = []
    for image in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(image.numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--body", choices=["multipart", "json"], default="json")
    args = parser.parse_args()
    row = asyncio.run(drive(args.url, args.clients, args.seconds, fashion_pngs(), args.body, args.warmup))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
