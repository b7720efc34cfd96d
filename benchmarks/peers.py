"""This service against LitServe and a naive FastAPI endpoint, on the same Engine, in one run.

All serve the same model with the same torch threads (HALO_* variables apply to all) and the
same maximum batch and window where they batch; this service runs twice, with its default batch
policy (adaptive) and with HALO_BATCH_POLICY=fixed. One closed-loop
client in a process of its own (benchmarks/closed_loop.py: one connection per simulated client,
JSON base64 Fashion-MNIST PNGs, 2 s warm-up, then the measured seconds) drives one server at a
time, while the others are frozen
(SIGSTOP: LitServe polls its queues when idle); servers and rounds alternate, so that the
machine's noise hits all alike. Per server and level: images/s, p50/p95/p99, errors and the
server's CPU per image (all its processes); ours over each peer compares the same round
(``paired_ratio``); then the raw model at batch 1 and at the mean batch this service formed.
halonet26t, which ships no weights, is served on fixed random ones (``fixed_weights``), compiled as
a trained model would be.

    python -m benchmarks.peers                              # default model at 1/8/32/64 clients, halonet26t at 8/32
    python -m benchmarks.peers --levels 32 --rounds 3 --skip-model-bound --json peers.json
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from statistics import mean
from typing import Dict, List, Optional

import torch

from app.config import Settings
from benchmarks.server import ROOT, ServerProcess, fixed_weights
from benchmarks.service import raw_model_throughput

SERVERS = ["halonet-serve", "halonet-serve-fixed", "litserve", "naive"]  # -fixed: HALO_BATCH_POLICY=fixed


def start_server(name: str, env: Dict[str, str]) -> ServerProcess:
    if name == "halonet-serve":
        return ServerProcess(env)
    if name == "halonet-serve-fixed":
        return ServerProcess({**env, "HALO_BATCH_POLICY": "fixed"})
    if name == "litserve":
        # LitServe runs one forward at a time (one worker process): its Engine gets one model
        # worker's threads, every core for a model-bound model, as our service would with one.
        env = {"HALO_MODEL_WORKERS": "1", **env}
    return ServerProcess(env, command=("benchmarks.peer_servers", name, "--port", "{port}"), ready_path="/health")


def measure(name: str, server: ServerProcess, clients: int, seconds: float, warmup: float) -> Dict[str, float]:
    """One level against one thawed server, with the client in its own process."""
    counters = ("halo_batch_size_count", "halo_batch_size_sum")
    batches = [server.metric(c) for c in counters] if name.startswith("halonet-serve") else None
    client = subprocess.Popen([sys.executable, "-m", "benchmarks.closed_loop", "--url", server.url, "--clients",
                               str(clients), "--seconds", str(seconds), "--warmup", str(warmup)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(warmup)
    cpu_from = server.cpu_seconds()
    output, _ = client.communicate(timeout=warmup + seconds + 120)
    server_cpu = server.cpu_seconds() - cpu_from
    row = json.loads(output)
    row.update(server=name, server_cpu_ms_per_image=server_cpu / max(row["requests"], 1) * 1e3)
    if batches is not None:
        after = [server.metric(c) for c in counters]
        row["mean_batch"] = (after[1] - batches[1]) / max(after[0] - batches[0], 1)
    return row


def run(model: Optional[str], levels: List[int], rounds: int, seconds: float, warmup: float,
        env: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Rows of every server, level and round; ``env``: more HALO_* settings for every server."""
    env = {**({"HALO_MODEL": model} if model else {}), **(env or {})}
    servers: Dict[str, ServerProcess] = {}
    rows = []
    try:
        # One at a time: each warm-up alone on the cores (ours times its batch sizes there; started side by
        # side, one run's adaptive policy began at batches of 4 where 12-18 served more), then frozen.
        for name in SERVERS:
            servers[name] = start_server(name, env)
            servers[name].wait_ready(timeout=180)  # LitServe starts its worker processes: slower
            servers[name].signal(signal.SIGSTOP)
        for clients in levels:
            for round_ in range(rounds):
                for name in SERVERS if round_ % 2 == 0 else SERVERS[::-1]:
                    servers[name].signal(signal.SIGCONT)
                    try:
                        row = measure(name, servers[name], clients, seconds, warmup)
                    finally:
                        servers[name].signal(signal.SIGSTOP)
                    row.update(model=model or Settings().model, round=round_)
                    rows.append(row)
                    print(f"{row['model']:<16} {name:<13} clients {clients:>3} round {round_}: "
                          f"{row['images_per_s']:7.1f} images/s  p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
                          f"p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}  server CPU "
                          f"{row['server_cpu_ms_per_image']:.2f} ms/image"
                          + (f"  mean batch {row['mean_batch']:.1f}" if "mean_batch" in row else ""), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return rows


def paired_ratio(runs: List[Dict], peer_runs: List[Dict], key: str) -> float:
    """Ours over a peer: the geometric mean of the ratios of the same round. A round runs the servers one
    after another within a minute, while this machine's pace drifted by up to 40% between rounds (every
    server slower in the second): a ratio of round means would weigh that drift, a paired one cancels it."""
    peer_by_round = {r["round"]: r[key] for r in peer_runs}
    ratios = [r[key] / peer_by_round[r["round"]] for r in runs if r["round"] in peer_by_round]
    return math.exp(mean(math.log(ratio) for ratio in ratios))


def summarize(rows: List[Dict]) -> List[Dict]:
    """Per model and level: each server's round means, and ours against each peer (``paired_ratio``)."""
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for clients in dict.fromkeys(r["concurrency"] for r in rows if r["model"] == model):
            level = {name: [r for r in rows if (r["model"], r["concurrency"], r["server"]) == (model, clients, name)]
                     for name in SERVERS}
            means = {name: {k: mean(r[k] for r in runs) for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms")}
                     for name, runs in level.items()}
            ours = means["halonet-serve"]
            entry = dict(model=model, concurrency=clients, means=means, p99_over_p50=ours["p99_ms"] / ours["p50_ms"])
            for peer in ("halonet-serve-fixed", "litserve", "naive"):
                for key, name in (("images_per_s", "throughput"), ("p50_ms", "p50"), ("p99_ms", "p99")):
                    entry[f"{name}_over_{peer}"] = paired_ratio(level["halonet-serve"], level[peer], key)
            summary.append(entry)
            print(f"{model:<16} clients {clients:>3}: images/s x{entry['throughput_over_litserve']:.2f} LitServe, "
                  f"x{entry['throughput_over_naive']:.2f} naive; p50 x{entry['p50_over_litserve']:.2f} LitServe; "
                  f"p99 x{entry['p99_over_litserve']:.2f} LitServe, x{entry['p99_over_naive']:.2f} naive; "
                  f"our p99/p50 {entry['p99_over_p50']:.2f}; the default (adaptive) batch policy over the fixed "
                  f"window: images/s x{entry['throughput_over_halonet-serve-fixed']:.2f}, "
                  f"p50 x{entry['p50_over_halonet-serve-fixed']:.2f}, "
                  f"p99 x{entry['p99_over_halonet-serve-fixed']:.2f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--model-bound-levels", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--skip-model-bound", action="store_true", help="no halonet26t rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", help="also write rows and summary to this JSON file")
    args = parser.parse_args()
    print(f"peer benchmark on {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{Settings().threads or 'default'} model threads (HALO_THREADS)", flush=True)
    with tempfile.TemporaryDirectory() as weights:
        rows = run(None, args.levels, args.rounds, args.seconds, args.warmup)
        checkpoints: Dict[str, str] = {}
        if not args.skip_model_bound:
            # halonet26t ships no weights: fixed random ones, so that it is served (and compiled) as a trained one.
            model_bound_env = fixed_weights("halonet26t", weights)
            checkpoints["halonet26t"] = model_bound_env["HALO_CHECKPOINT"]
            rows += run("halonet26t", args.model_bound_levels, args.rounds, args.seconds, args.warmup, model_bound_env)
        summary = summarize(rows)
        ours = {(r["model"], r["concurrency"]): r["mean_batch"] for r in rows if r["server"] == "halonet-serve"}
        raw = {}
        for (model, clients), batch in ours.items():
            settings = Settings(model=model, checkpoint=checkpoints.get(model))
            for size in sorted({1, max(1, round(batch))}):
                if (model, size) not in raw:
                    raw[(model, size)] = raw_model_throughput(settings, size)
                    print(f"raw model {model} at batch {size:>3}: {raw[(model, size)]:8.1f} images/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, summary=summary,
                           raw=[dict(model=m, batch=b, images_per_s=v) for (m, b), v in raw.items()]), f, indent=2)


if __name__ == "__main__":
    main()
