"""Service throughput and latency, batching on and off, next to the raw model in the same run.

For each mode it starts ``python -m app`` on loopback (batching on: the configured maximum batch;
off: ``HALO_MAX_BATCH_SIZE=1``), drives it with async httpx clients at increasing concurrency
(each client sends one single-image request after another) and prints images/s and p50/p95/p99
latency. Then, with no server running, it times the bare model (prepared as the service prepares
it) at the batch size the service reached, so the overhead of HTTP, decoding and batching shows.

    python -m benchmarks.service                     # shipped default model
    python -m benchmarks.service --concurrency 1 8 32 --seconds 5 --json out.json
"""
import argparse
import asyncio
import io
import json
import os
import time
from typing import Dict, List, Optional

import httpx
import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import Engine
from benchmarks.timing import time_alternating
from benchmarks.server import ServerProcess


def sample_images(count: int = 16) -> List[bytes]:
    """Distinct 28x28 grayscale PNGs, the size and kind of image the default model serves."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


async def drive(url: str, concurrency: int, seconds: float, images: List[bytes]) -> Dict[str, float]:
    latencies: List[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one_client(index: int) -> None:
            nonlocal errors
            i = index
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                response = await client.post("/predict?top_k=1", files=[("file", ("x.png", images[i % len(images)]))])
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    quantiles = np.percentile(latencies, [50, 95, 99]) * 1e3 if latencies else [float("nan")] * 3
    return dict(concurrency=concurrency, images_per_s=len(latencies) / elapsed, p50_ms=float(quantiles[0]),
                p95_ms=float(quantiles[1]), p99_ms=float(quantiles[2]), requests=len(latencies), errors=errors)


def run_mode(name: str, env: Dict[str, str], levels: List[int], seconds: float,
             images: List[bytes]) -> List[Dict[str, float]]:
    server = ServerProcess(env)
    try:
        server.wait_ready()
        rows = []
        for concurrency in levels:
            passes_before = server.metric("halo_batch_size_count")
            images_before = server.metric("halo_batch_size_sum")
            row = asyncio.run(drive(server.url, concurrency, seconds, images))
            passes = server.metric("halo_batch_size_count") - passes_before
            row.update(mode=name, mean_batch=(server.metric("halo_batch_size_sum") - images_before) / max(passes, 1))
            rows.append(row)
            print(f"batching {name:<3} clients {concurrency:>3}: {row['images_per_s']:8.1f} images/s  "
                  f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                  f"mean batch {row['mean_batch']:5.1f}  errors {row['errors']}", flush=True)
        return rows
    finally:
        server.stop()


def raw_model_throughput(settings: Settings, batch: int) -> float:
    """Images/s of the bare forward pass at ``batch``, as the service prepares the model."""
    engine = Engine(settings)
    inputs = torch.zeros(batch, *engine.cfg.input_size)
    seconds = time_alternating([lambda: engine.forward(inputs, set())], rounds=5, min_seconds=3.0)[0]
    return batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--model", help="HALO_MODEL for both servers (default: the shipped default)")
    parser.add_argument("--checkpoint", help="HALO_CHECKPOINT for both servers")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    base = {k: v for k, v in (("HALO_MODEL", args.model), ("HALO_CHECKPOINT", args.checkpoint)) if v}
    base["HALO_MAX_WAIT_MS"] = str(args.max_wait_ms)
    images = sample_images()
    print(f"service benchmark on {os.cpu_count()} cores, torch {torch.__version__}")
    rows = run_mode("on", {**base, "HALO_MAX_BATCH_SIZE": str(args.max_batch_size)}, args.concurrency,
                    args.seconds, images)
    rows += run_mode("off", {**base, "HALO_MAX_BATCH_SIZE": "1"}, args.concurrency, args.seconds, images)
    settings = Settings(**{k[5:].lower(): v for k, v in base.items()})
    batch_at = {r["concurrency"]: max(1, round(r["mean_batch"])) for r in rows if r["mode"] == "on"}
    raw: Dict[int, float] = {}
    for concurrency, batch in batch_at.items():
        if batch not in raw:
            raw[batch] = raw_model_throughput(settings, batch)
        print(f"raw model at batch {batch:>3} (the mean batch with {concurrency} clients): {raw[batch]:8.1f} images/s")
    summary: Dict[str, Optional[float]] = {}
    on = {r["concurrency"]: r for r in rows if r["mode"] == "on"}
    off = {r["concurrency"]: r for r in rows if r["mode"] == "off"}
    if 32 in on and 32 in off:
        summary["on_over_off_at_32"] = on[32]["images_per_s"] / off[32]["images_per_s"]
        summary["on_over_raw_at_32"] = on[32]["images_per_s"] / raw[batch_at[32]]
        print(f"at 32 clients: batching on / off = x{summary['on_over_off_at_32']:.2f}; "
              f"on / raw model at batch {batch_at[32]} = {summary['on_over_raw_at_32']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, raw_images_per_s=raw, summary=summary), f, indent=2)


if __name__ == "__main__":
    main()
