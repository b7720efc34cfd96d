"""Service throughput and latency, batching on and off, next to the raw model in the same run.

For each mode it starts ``python -m app`` on loopback (batching on: the configured maximum batch;
off: ``HALO_MAX_BATCH_SIZE=1``), drives it with async httpx clients at increasing concurrency
(each client sends one single-image request after another) and prints images/s and p50/p95/p99
latency, the mean batch and the forward pass's time as served (from the server's metrics), and
the CPU time each request cost the server process and the client. Then, with no server running,
it times the bare model (prepared as the service prepares it) at batch 1 and at the batch sizes
the service reached, so the overhead of HTTP, decoding, batching and core sharing shows. HALO_*
variables in the environment apply to the servers and to the bare model alike.

    python -m benchmarks.service                     # shipped default model
    python -m benchmarks.service --concurrency 1 8 32 --seconds 5 --json out.json
"""
import argparse
import asyncio
import io
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import Engine
from benchmarks.closed_loop import drive
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


def run_mode(name: str, env: Dict[str, str], levels: List[int], seconds: float,
             images: List[bytes]) -> List[Dict[str, float]]:
    server = ServerProcess(env)
    try:
        server.wait_ready()
        rows = []
        for concurrency in levels:
            counters = ("halo_batch_size_count", "halo_batch_size_sum", "halo_inference_seconds_sum")
            before = [server.metric(c) for c in counters]
            cpu_before = server.cpu_seconds()
            row = asyncio.run(drive(server.url, concurrency, seconds, images))
            server_cpu = server.cpu_seconds() - cpu_before
            passes, batched_images, forward_seconds = (server.metric(c) - b for c, b in zip(counters, before))
            row.update(mode=name, mean_batch=batched_images / max(passes, 1),
                       forward_ms_per_batch=forward_seconds / max(passes, 1) * 1e3,
                       server_cpu_ms_per_request=server_cpu / max(row["requests"], 1) * 1e3)
            rows.append(row)
            print(f"batching {name:<3} clients {concurrency:>3}: {row['images_per_s']:8.1f} images/s  "
                  f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                  f"mean batch {row['mean_batch']:5.1f} ({row['forward_ms_per_batch']:.1f} ms a forward pass)  "
                  f"errors {row['errors']}  CPU ms/request: server "
                  f"{row['server_cpu_ms_per_request']:.1f}, client {row['client_cpu_ms_per_request']:.1f}", flush=True)
        return rows
    finally:
        server.stop()


def raw_model_throughput(settings: Settings, batch: int) -> float:
    """Images/s of the bare forward pass at ``batch``, as the service prepares the model."""
    engine = Engine(settings)
    inputs = torch.zeros(batch, *engine.cfg.input_size)
    seconds = time_alternating([lambda: engine.forward(inputs, [None] * batch)], rounds=5, min_seconds=3.0)[0]
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
    raw: Dict[int, float] = {1: raw_model_throughput(settings, 1)}
    print(f"raw model at batch   1: {raw[1]:8.1f} images/s")
    for concurrency, batch in batch_at.items():
        if batch not in raw:
            raw[batch] = raw_model_throughput(settings, batch)
        print(f"raw model at batch {batch:>3} (the mean batch with {concurrency} clients): {raw[batch]:8.1f} images/s"
              f" ({batch / raw[batch] * 1e3:.1f} ms a forward pass)")
    summary: Dict[str, Optional[float]] = {}
    on = {r["concurrency"]: r for r in rows if r["mode"] == "on"}
    off = {r["concurrency"]: r for r in rows if r["mode"] == "off"}
    if 32 in on and 32 in off:
        summary["on_over_off_at_32"] = on[32]["images_per_s"] / off[32]["images_per_s"]
        summary["on_over_raw_at_32"] = on[32]["images_per_s"] / raw[batch_at[32]]
        # With the same cost per request outside the model, on / off can be at most the model's own
        # gain from batching: raw(batch) / raw(1).
        summary["raw_batch_gain_at_32"] = raw[batch_at[32]] / raw[1]
        print(f"at 32 clients: batching on / off = x{summary['on_over_off_at_32']:.2f} (the model's own gain from "
              f"batch 1 to {batch_at[32]}: x{summary['raw_batch_gain_at_32']:.2f}); "
              f"on / raw model at batch {batch_at[32]} = {summary['on_over_raw_at_32']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, raw_images_per_s=raw, summary=summary), f, indent=2)


if __name__ == "__main__":
    main()
