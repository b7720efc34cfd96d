"""Service throughput and latency next to the raw model in the same run, on the CPU or a CUDA GPU.

For each mode it starts ``python -m app`` on loopback (batching on: the configured maximum batch;
off, on the CPU only: ``HALO_MAX_BATCH_SIZE=1``), drives it with closed-loop clients in processes of
their own (benchmarks/closed_loop.py; ``--client-processes`` splits them, all measuring one window)
at increasing concurrency (each client sends one single-image request after another) and prints
images/s and p50/p95/p99 latency over every request of the level, the mean batch and the forward
pass's time as served (from the server's metrics), the CPU time each request cost the server
process and the clients, and the busiest client process's share of a core (near 100%: the client
set the pace). Then, with no server running, it times the bare model (prepared as the service
prepares it) at batch 1 and at the batch sizes the service reached, so the overhead of HTTP,
decoding, batching and core sharing shows, and prints the service over the raw model at the top
level. HALO_* variables in the environment apply to the servers and to the bare model alike.

    python -m benchmarks.service                     # shipped default model, CPU
    python -m benchmarks.service --concurrency 1 8 32 --seconds 5 --json out.json
    python -m benchmarks.service --device cuda       # halonet26t fp16 at 1/32/128 clients, 4 client processes
"""
import argparse
import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import httpx
import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.engine import Engine
from benchmarks.closed_loop import ClientProcesses
from benchmarks.server import ServerProcess, metric_value
from benchmarks.timing import check_device, time_alternating
from model import list_models
from model.halonet import MODEL_CONFIGS

# Per device, what an option left out means, and the batching modes measured (no option). The shipped
# 28 px model says nothing about a GPU, and there batching off is not the question: the service against
# the raw model at 128 clients is.
DEVICE_DEFAULTS = {
    "cpu": dict(concurrency=[1, 4, 16, 32, 64], client_processes=1, model=None, dtype=None, modes=["on", "off"]),
    "cuda": dict(concurrency=[1, 32, 128], client_processes=4, model="halonet26t", dtype="float16", modes=["on"]),
}
SERVED_COUNTERS = ("halo_batch_size_count", "halo_batch_size_sum", "halo_inference_seconds_sum", "halo_images_total")


def sample_images(input_size: Sequence[int], count: int = 16) -> List[bytes]:
    """Distinct images of the kind the model serves: for a grayscale model, 28x28 PNGs (Fashion-MNIST's
    kind); else RGB JPEGs of a photo's size for the model, each side from the input's to a quarter more,
    smooth (coarse noise enlarged, plus a fine grain) so that they compress and decode as photos do
    rather than as noise."""
    rng = np.random.default_rng(0)
    channels, side = input_size[0], input_size[-1]
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        if channels == 1:
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buffer, format="PNG")
        else:
            width, height = (int(s) for s in rng.integers(side, side * 5 // 4 + 1, 2))
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
            smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
            grain = rng.integers(-8, 9, smooth.shape, dtype=np.int16)
            Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def served_counters(url: str) -> List[float]:
    """SERVED_COUNTERS of the server at ``url``, from one read of its metrics (one instant)."""
    page = httpx.get(f"{url}/metrics").text
    return [metric_value(page, name) for name in SERVED_COUNTERS]


def run_mode(name: str, env: Dict[str, str], levels: List[int], seconds: float, image_dir: Path,
             client_processes: int = 1, warmup: float = 2.0) -> List[Dict[str, float]]:
    server = ServerProcess(env)
    try:
        server.wait_ready(timeout=300)  # a GPU server compiles its kernels and captures its graphs first
        rows = []
        for concurrency in levels:
            clients = ClientProcesses(server.url, concurrency, client_processes, seconds, warmup, image_dir)
            # The server's figures over the clients' measured window, not their warm-up.
            time.sleep(max(0.0, clients.start - time.time()))
            before, cpu_before = served_counters(server.url), server.cpu_seconds()
            time.sleep(max(0.0, clients.start + seconds - time.time()))
            after, server_cpu = served_counters(server.url), server.cpu_seconds() - cpu_before
            passes, batched_images, forward_seconds, served = (a - b for a, b in zip(after, before))
            row = clients.wait()
            row.update(mode=name, mean_batch=batched_images / max(passes, 1),
                       forward_ms_per_batch=forward_seconds / max(passes, 1) * 1e3,
                       served_images_per_s=served / seconds,
                       server_cpu_ms_per_request=server_cpu / max(row["requests"], 1) * 1e3)
            rows.append(row)
            print(f"batching {name:<3} clients {concurrency:>3}: {row['images_per_s']:8.1f} images/s  "
                  f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                  f"mean batch {row['mean_batch']:5.1f} ({row['forward_ms_per_batch']:.1f} ms a forward pass)  "
                  f"errors {row['errors']}  CPU ms/request: server {row['server_cpu_ms_per_request']:.1f}, "
                  f"client {row['client_cpu_ms_per_request']:.2f} (busiest client process "
                  f"{row['client_busiest_process_cpu']:.0%} of a core)", flush=True)
        return rows
    finally:
        server.stop()


def raw_model_throughput(settings: Settings, batch: int) -> float:
    """Images/s of the bare forward pass at ``batch``, as the service prepares the model."""
    return raw_model_throughputs(settings, [batch])[batch]


def raw_model_throughputs(settings: Settings, batches: List[int]) -> Dict[int, float]:
    """Images/s of the bare forward pass at each of ``batches``, with one model prepared as the service
    prepares it (a CPU batch in, probabilities back on the CPU: what a served forward pass costs)."""
    engine = Engine(settings)
    throughputs = {}
    for batch in batches:
        inputs = torch.zeros(batch, *engine.cfg.input_size)
        seconds = time_alternating([lambda: engine.forward(inputs, [None] * batch)], rounds=5, min_seconds=3.0)[0]
        throughputs[batch] = batch / seconds
    return throughputs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The options, with the defaults of the chosen device filled in; argparse's error for
    ``--device cuda`` without a GPU."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu",
                        help="HALO_DEVICE of the servers and the raw model")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="HALO_DTYPE (default: float16 on cuda, the service's own on cpu)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="levels (default: 1 4 16 32 64; cuda: 1 32 128)")
    parser.add_argument("--client-processes", type=int,
                        help="processes the clients of a level are split over (default: 1; cuda: 4)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each level's measure")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--model", choices=list_models(),
                        help="HALO_MODEL for the servers (default: the shipped default; cuda: halonet26t)")
    parser.add_argument("--checkpoint", help="HALO_CHECKPOINT for the servers")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    check_device(parser, args)
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def server_env(args: argparse.Namespace) -> Dict[str, str]:
    """The HALO_* settings that both modes' servers and the raw model share."""
    env = {"HALO_DEVICE": args.device, "HALO_MAX_WAIT_MS": str(args.max_wait_ms)}
    for name, value in (("HALO_MODEL", args.model), ("HALO_CHECKPOINT", args.checkpoint), ("HALO_DTYPE", args.dtype)):
        if value:
            env[name] = value
    return env


def exit_on_sigterm(number: int, frame: object) -> None:
    """SIGTERM (timeout's, in benchmarks/gpu_session.sh) as SystemExit, which runs the finally blocks that
    stop the servers: they run in sessions of their own and would outlive this process. Once only:
    timeout signals the process, then its group, and a second SystemExit would cut a server's stop short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(128 + number)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    base = server_env(args)
    settings = Settings(**{k[5:].lower(): v for k, v in base.items()})
    where = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
    print(f"service benchmark: {settings.model} {settings.dtype} on {where}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, clients in {args.client_processes} process(es)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as image_dir:
        for index, image in enumerate(sample_images(MODEL_CONFIGS[settings.model].pretrained.input_size)):
            (Path(image_dir) / f"{index:02d}").write_bytes(image)
        for mode in args.modes:
            max_batch = args.max_batch_size if mode == "on" else 1
            rows += run_mode(mode, {**base, "HALO_MAX_BATCH_SIZE": str(max_batch)}, args.concurrency, args.seconds,
                             Path(image_dir), args.client_processes, args.warmup)
    on = {r["concurrency"]: r for r in rows if r["mode"] == "on"}
    off = {r["concurrency"]: r for r in rows if r["mode"] == "off"}
    batch_at = {concurrency: max(1, round(r["mean_batch"])) for concurrency, r in on.items()}
    raw = raw_model_throughputs(settings, sorted({1, *batch_at.values()}))
    print(f"raw model at batch   1: {raw[1]:8.1f} images/s")
    for concurrency, batch in batch_at.items():
        print(f"raw model at batch {batch:>3} (the mean batch with {concurrency} clients): {raw[batch]:8.1f} images/s"
              f" ({batch / raw[batch] * 1e3:.1f} ms a forward pass)")
    summary: Dict[str, float] = {f"on_over_raw_at_{c}": on[c]["images_per_s"] / raw[b] for c, b in batch_at.items()}
    top = max(on)
    print(f"at {top} clients: the service / the raw model at batch {batch_at[top]} = "
          f"{summary[f'on_over_raw_at_{top}']:.0%}", flush=True)
    if 32 in on and 32 in off:
        summary["on_over_off_at_32"] = on[32]["images_per_s"] / off[32]["images_per_s"]
        # With the same cost per request outside the model, on / off can be at most the model's own
        # gain from batching: raw(batch) / raw(1).
        summary["raw_batch_gain_at_32"] = raw[batch_at[32]] / raw[1]
        print(f"at 32 clients: batching on / off = x{summary['on_over_off_at_32']:.2f} (the model's own gain from "
              f"batch 1 to {batch_at[32]}: x{summary['raw_batch_gain_at_32']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=where, model=settings.model, dtype=settings.dtype, cores=os.cpu_count(),
                           torch=torch.__version__, client_processes=args.client_processes, rows=rows,
                           raw_images_per_s=raw, summary=summary), f, indent=2)


if __name__ == "__main__":
    main()
