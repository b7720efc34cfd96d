"""``make loadtest``: Locust headless against the service, then a report folder.

Starts the service on loopback (or targets ``HALO_URL``), runs ``tests/load/locustfile.py`` for a
given duration and user count, and writes to the report folder: Locust's CSV files and HTML
report, ``throughput.png`` and ``latency.png`` (over time), ``by_users.png`` (throughput and
p50/p95/p99 per user count) and ``summary.md``.

    python -m benchmarks.loadtest --users 32 --spawn-rate 4 --duration 60 --out loadtest-report
"""
import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.server import ROOT, ServerProcess  # noqa: E402

LOCUSTFILE = ROOT / "tests" / "load" / "locustfile.py"


def run_locust(url: str, users: int, spawn_rate: float, duration: int, out: Path) -> int:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{duration}s",
               "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
               "--only-summary", "--exit-code-on-error", "1"]
    return subprocess.run(command, cwd=ROOT).returncode


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_charts(out: Path) -> None:
    history = [r for r in _rows(out / "locust_stats_history.csv") if r["Name"] == "Aggregated"]
    start = int(history[0]["Timestamp"]) if history else 0
    t = [int(r["Timestamp"]) - start for r in history]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(t, [_number(r["Requests/s"]) or 0 for r in history], label="requests/s")
    axis.plot(t, [_number(r["Failures/s"]) or 0 for r in history], label="failures/s")
    axis.set(xlabel="seconds", ylabel="per second", title="Throughput over time")
    axis.legend()
    figure.savefig(out / "throughput.png", dpi=100, bbox_inches="tight")
    figure, axis = plt.subplots(figsize=(8, 4))
    for column in ("50%", "95%", "99%"):
        axis.plot(t, [_number(r[column]) for r in history], label=f"p{column[:-1]}")
    axis.set(xlabel="seconds", ylabel="ms", title="Latency over time")
    axis.legend()
    figure.savefig(out / "latency.png", dpi=100, bbox_inches="tight")
    by_users: Dict[int, List[Dict[str, str]]] = {}
    for row in history:
        by_users.setdefault(int(row["User Count"]), []).append(row)
    users = sorted(by_users)

    def mean(rows: List[Dict[str, str]], column: str) -> float:
        values = [v for v in (_number(r[column]) for r in rows) if v is not None]
        return sum(values) / len(values) if values else float("nan")

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(users, [mean(by_users[u], "Requests/s") for u in users], marker="o")
    left.set(xlabel="users", ylabel="requests/s", title="Throughput per user count")
    for column in ("50%", "95%", "99%"):
        right.plot(users, [mean(by_users[u], column) for u in users], marker="o", label=f"p{column[:-1]}")
    right.set(xlabel="users", ylabel="ms", title="Latency per user count")
    right.legend()
    figure.savefig(out / "by_users.png", dpi=100, bbox_inches="tight")
    plt.close("all")


def write_summary(out: Path, users: int, duration: int, url: str) -> Dict[str, str]:
    stats = _rows(out / "locust_stats.csv")
    lines = [f"# Load test: {users} users, {duration} s, {url}", "",
             "| endpoint | requests | failures | median ms | p95 ms | p99 ms | requests/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in stats:
        lines.append(f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} | {row['50%']} | "
                     f"{row['95%']} | {row['99%']} | {float(row['Requests/s']):.1f} |")
    lines += ["", "Charts: throughput.png, latency.png, by_users.png; Locust's own report: locust.html."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return next(r for r in stats if r["Name"] == "Aggregated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", 16)))
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument("--duration", type=int, default=int(os.environ.get("LOADTEST_DURATION", 60)), help="seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest-report")
    parser.add_argument("--url", default=os.environ.get("HALO_URL"), help="target; default: start the service")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = None if args.url else ServerProcess({})
    try:
        if server is not None:
            server.wait_ready()
        url = args.url or server.url
        code = run_locust(url, args.users, args.spawn_rate, args.duration, args.out)
    finally:
        if server is not None:
            server.stop()
    write_charts(args.out)
    total = write_summary(args.out, args.users, args.duration, url)
    print(f"{total['Request Count']} requests, {total['Failure Count']} failures; report in {args.out}")
    sys.exit(code)


if __name__ == "__main__":
    main()
