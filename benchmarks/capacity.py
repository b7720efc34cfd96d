"""One replica's capacity, and the autoscaling target that follows from it (deploy/k8s, docs/deploy.md).

Starts ``python -m app`` as a pod runs it (HALO_THREADS=1 unless set: one model thread, a core for
the request path), drives it with closed-loop clients at increasing concurrency (single-image JSON
requests of Fashion-MNIST PNGs) and samples its ``halo_images_in_flight`` gauge, the metric the
HorizontalPodAutoscaler reads, four times a second. For each level: images/s, p50/p99 and the mean
images in flight. Then, for the p99 you target, the highest load that still meets it and the HPA
target it implies: the images in flight there times a headroom for the time scaling takes.

    python -m benchmarks.capacity                       # shipped model, p99 target 100 ms
    python -m benchmarks.capacity --p99-ms 250 --concurrency 4 8 16 32 48 64 --json capacity.json
"""
import argparse
import asyncio
import json
import os
import threading
from typing import Dict, List

import numpy as np

from benchmarks.closed_loop import drive, fashion_pngs
from benchmarks.server import ServerProcess

# The HPA acts on a load it saw a minute or two ago (scrape interval, the adapter's averaging window,
# its own sync period, then a pod's start and warm-up): scaling out at 70% of the in-flight count
# where p99 reaches its target leaves the replicas that room while new ones come.
HEADROOM = 0.7


def sample_until(server: ServerProcess, metric: str, stop: threading.Event, every_s: float = 0.25) -> List[float]:
    """A list that a background thread fills with ``metric``'s value every ``every_s`` until ``stop``."""
    samples: List[float] = []

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(server.metric(metric))

    threading.Thread(target=sample, daemon=True).start()
    return samples


def measure(server: ServerProcess, concurrency: int, seconds: float, images: List[bytes]) -> Dict[str, float]:
    stop = threading.Event()
    samples = sample_until(server, "halo_images_in_flight", stop)
    try:
        row = asyncio.run(drive(server.url, concurrency, seconds, images, body="json", warmup=2.0))
    finally:
        stop.set()
    row["in_flight"] = float(np.mean(samples)) if samples else float("nan")
    return row


def autoscaling_target(rows: List[Dict[str, float]], p99_ms: float) -> Dict[str, float]:
    """The most images/s a level served with p99 within ``p99_ms`` and no error, the images in flight
    there, and the HPA target (those times HEADROOM); empty when no level kept the p99."""
    within = [r for r in rows if r["p99_ms"] <= p99_ms and not r["errors"]]
    if not within:
        return {}
    best = max(within, key=lambda r: r["images_per_s"])
    return dict(capacity_images_per_s=best["images_per_s"], in_flight_at_capacity=best["in_flight"],
                clients_at_capacity=best["concurrency"], hpa_target=max(1, round(best["in_flight"] * HEADROOM)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per level, after a 2 s warm-up")
    parser.add_argument("--p99-ms", type=float, default=100.0, help="the p99 latency a replica must keep")
    parser.add_argument("--json", help="also write the rows and the target to this JSON file")
    args = parser.parse_args()
    server = ServerProcess({"HALO_THREADS": os.environ.get("HALO_THREADS", "1")})
    images = fashion_pngs()
    rows = []
    try:
        server.wait_ready()
        print(f"capacity of one replica on {os.cpu_count()} cores (client on the same machine)")
        for concurrency in args.concurrency:
            row = measure(server, concurrency, args.seconds, images)
            rows.append(row)
            print(f"clients {concurrency:>3}: {row['images_per_s']:7.1f} images/s  p50 {row['p50_ms']:6.1f} ms  "
                  f"p99 {row['p99_ms']:6.1f} ms  in flight {row['in_flight']:5.1f}  errors {row['errors']}", flush=True)
    finally:
        server.stop()
    target = autoscaling_target(rows, args.p99_ms)
    if target:
        print(f"p99 <= {args.p99_ms:g} ms up to {target['capacity_images_per_s']:.0f} images/s with "
              f"{target['in_flight_at_capacity']:.1f} images in flight ({target['clients_at_capacity']} clients): "
              f"HPA target averageValue {target['hpa_target']} (x{HEADROOM} headroom)")
    else:
        print(f"no level kept p99 <= {args.p99_ms:g} ms")
    result = dict(rows=rows, p99_target_ms=args.p99_ms, headroom=HEADROOM, **target)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
