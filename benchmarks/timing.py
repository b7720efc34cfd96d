"""What every benchmark here shares: alternating timing, geometric means, common options."""
import argparse
import math
import os
import statistics
import time
from typing import Callable, List

import torch


def time_alternating(fns: List[Callable[[], object]], rounds: int, min_seconds: float,
                     sync: Callable[[], None] = lambda: None) -> List[float]:
    """Median seconds per call of each fn, timed in alternation so that machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up: allocations, lazy init, kernel compilation
    sync()
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds:
                    break
            out.append(elapsed / calls)
    return [statistics.median(s) for s in samples]


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for a device's queued work before a clock is read: CUDA runs asynchronously, the CPU does not."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def geomean(values: List[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int, seconds: float) -> None:
    """--device, --batch, --threads, --rounds, --seconds, --json; --device cuda fails clearly without a GPU."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 8 on CPU, 64 on GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating timing rounds per row")
    parser.add_argument("--seconds", type=float, default=seconds, help="timing budget per implementation per row")
    parser.add_argument("--json", help="also write the results to this JSON file")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
