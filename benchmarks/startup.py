"""How long a service start takes to its first answer, by ``HALO_COMPILE``: off (the traced graph), and
compiled with a cold cache (an empty ``HALO_COMPILE_CACHE`` and an empty inductor cache: a new machine)
and then with the warm cache the first start left (a restart, another replica, the Docker image).

    python -m benchmarks.startup                                # the shipped model and halonet26t
    python -m benchmarks.startup --models halonet_compact --json startup.json

Each start is ``python -m app`` (``benchmarks.server``) with its warm-up on, as served; the clock runs
from the process's start to ``/readyz`` answering 200, then to the answer of one /predict.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import httpx

from benchmarks.closed_loop import fashion_pngs
from benchmarks.server import ServerProcess, fixed_weights

MODELS = ("halonet_compact", "halonet26t")


def one_start(model: str, env: Dict[str, str], image: bytes) -> Dict[str, float]:
    """Seconds from the start of ``python -m app`` to ready, and to its first answer."""
    started = time.perf_counter()
    server = ServerProcess({"HALO_MODEL": model, **env})
    try:
        server.wait_ready(timeout=900)
        ready = time.perf_counter() - started
        response = httpx.post(server.url + "/predict", files=[("file", ("x.png", image))], timeout=120)
        response.raise_for_status()
        answered = time.perf_counter() - started
        graph = httpx.get(server.url + "/v1/model").json()["graph"]
    finally:
        server.stop()
    return dict(ready_s=ready, first_answer_s=answered, graph=graph)


def run(models: List[str]) -> List[Dict[str, object]]:
    image = fashion_pngs(1)[0]
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as inductor:
            weights = fixed_weights(model, inductor)
            # An empty inductor cache too: with its own left from an earlier compile, a "cold" start is not.
            cold_env = {"HALO_COMPILE": "on", "HALO_COMPILE_CACHE": cache, "TORCHINDUCTOR_CACHE_DIR": inductor,
                        **weights}
            starts = {"off": one_start(model, {"HALO_COMPILE": "off", **weights}, image),
                      "compiled, cold cache": one_start(model, cold_env, image),
                      "compiled, warm cache": one_start(model, {**cold_env, "HALO_COMPILE": "auto"}, image)}
        for kind, figures in starts.items():
            rows.append(dict(model=model, start=kind, **figures))
            print(f"{model:<18} {kind:<22} ready {figures['ready_s']:6.1f} s  first answer "
                  f"{figures['first_answer_s']:6.1f} s  ({figures['graph']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    print(f"service starts, {os.cpu_count()} cores")
    rows = run(args.models)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
