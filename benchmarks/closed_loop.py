"""A closed-loop client: N simulated clients, each with its own connection, sending one
single-image /predict request after another; throughput and latency percentiles.

In-process (``drive``, for benchmarks/capacity.py) or as a process of its own, so that a benchmark
of several servers gives each the same client (benchmarks/peers.py), and so that the clients can be
split over several processes that measure one window (``ClientProcesses``, for benchmarks/service.py:
one asyncio process saturates its core long before a GPU-served model saturates the GPU):

    python -m benchmarks.closed_loop --url http://127.0.0.1:8000 --clients 32 --seconds 10 --body json
"""
import argparse
import asyncio
import base64
import gc
import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from benchmarks.server import ROOT

REQUEST_TIMEOUT_S = 60.0


def request_bytes(host: str, image: bytes, body: str) -> bytes:
    """One /predict request as it goes on the wire (HTTP/1.1, keep-alive): multipart (``file``, options
    in the query) or JSON base64."""
    if body == "json":
        payload = json.dumps({"images": [base64.b64encode(image).decode()], "top_k": 1}).encode()
        target, content_type = "/predict", "application/json"
    else:
        boundary = "halonet-closed-loop"
        payload = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
                   f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        target, content_type = "/predict?top_k=1", f"multipart/form-data; boundary={boundary}"
    return (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads each answer's status
    and body. Why not httpx: its client took 0.9 ms of CPU per request (32 clients), 40% of what the
    machine spent per request with the server, on the cores the server shares; this takes a tenth."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.streams: Optional[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None

    async def exchange(self, request: bytes) -> int:
        """Sends ``request``, reads the whole answer; its status (0: the connection failed)."""
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            length = re.search(r"\r\ncontent-length: *(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            else:  # chunked
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            if "\r\nconnection: close" in head:
                self.close()
            return int(head[9:12])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return 0

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def client_row(concurrency: int, seconds: float, answered: int, errors: int, latencies_ms: List[float],
               cpu_seconds: List[float]) -> Dict[str, float]:
    """A level's figures from what the clients of one or several processes saw in the same ``seconds``:
    percentiles over every latency (never an average of the processes' percentiles), the clients' CPU
    per request, and the busiest process's share of one core (an asyncio process uses at most one:
    near 100%, the client, not the server, set the pace)."""
    quantiles = np.percentile(latencies_ms, [50, 95, 99]) if latencies_ms else [float("nan")] * 3
    return dict(concurrency=concurrency, images_per_s=answered / seconds, p50_ms=float(quantiles[0]),
                p95_ms=float(quantiles[1]), p99_ms=float(quantiles[2]), requests=answered, errors=errors,
                client_cpu_s=sum(cpu_seconds), client_cpu_ms_per_request=sum(cpu_seconds) / max(answered, 1) * 1e3,
                client_busiest_process_cpu=max(cpu_seconds) / seconds)


def merge(rows: List[Dict], seconds: float) -> Dict[str, float]:
    """One row from the rows of client processes that measured the same ``seconds``, each with its
    ``latencies_ms`` (``drive(..., keep_latencies=True)``)."""
    return client_row(sum(r["concurrency"] for r in rows), seconds, sum(r["requests"] for r in rows),
                      sum(r["errors"] for r in rows), [latency for r in rows for latency in r["latencies_ms"]],
                      [r["client_cpu_s"] for r in rows])


async def drive(url: str, concurrency: int, seconds: float, images: List[bytes], body: str = "multipart",
                warmup: float = 0.0, start_at: Optional[float] = None,
                keep_latencies: bool = False) -> Dict[str, float]:
    """``concurrency`` clients for ``warmup`` + ``seconds``, or from now until ``start_at`` (a
    ``time.time()``, shared by the processes of ``ClientProcesses``) + ``seconds``. Throughput counts
    the answers that come in the measured ``seconds``; latency and errors, the requests sent in them.
    Requests sent during the warm-up are left out: at 64 clients some of the connections' first
    requests came back seconds late, with every server alike, and set p99. ``keep_latencies`` adds
    every latency (``latencies_ms``), for ``merge``."""
    # The client's own full garbage collections (of torch, loaded for the dataset, and httpx then: 115-185
    # ms, once per 12 s run at 32 clients) stalled every connection at once and set every server's
    # p99 alike: what this process holds from before the run is moved out of the collector's sight.
    gc.collect()
    gc.freeze()
    done: List[Tuple[float, float, float, bool]] = []  # (sent at, answered at, latency, answered 200)
    now = time.monotonic()
    measure_from = now + (warmup if start_at is None else start_at - time.time())
    if measure_from < now:
        raise RuntimeError(f"the clients started {now - measure_from:.1f} s into their measured window")
    stop_at = measure_from + seconds
    host = urllib.parse.urlsplit(url).netloc
    requests = [request_bytes(host, image, body) for image in images]

    # One keep-alive connection per simulated client, as independent users would have.
    async def one_client(index: int) -> None:
        i, connection = index, Connection(url)
        try:
            while time.monotonic() < stop_at:
                sent, started = time.monotonic(), time.perf_counter()
                try:
                    status = await asyncio.wait_for(connection.exchange(requests[i % len(requests)]),
                                                    REQUEST_TIMEOUT_S)
                except asyncio.TimeoutError:
                    connection.close()  # an answer may still come: not on this connection's next request
                    status = 0
                done.append((sent, time.monotonic(), time.perf_counter() - started, status == 200))
                i += 1
        finally:
            connection.close()

    clients = asyncio.gather(*(one_client(i) for i in range(concurrency)))
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_from = time.process_time()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    client_cpu = time.process_time() - cpu_from
    await clients
    answered = sum(1 for _, at, _, ok in done if ok and measure_from <= at <= stop_at)
    sent = [(latency, ok) for at, _, latency, ok in done if measure_from <= at < stop_at]
    latencies_ms = [latency * 1e3 for latency, ok in sent if ok]
    row = client_row(concurrency, seconds, answered, len(sent) - len(latencies_ms), latencies_ms, [client_cpu])
    if keep_latencies:
        row["latencies_ms"] = latencies_ms
    return row


class ClientProcesses:
    """``clients`` closed-loop clients split over up to ``processes`` processes of this module (started
    here), all measuring one window: ``seconds`` from ``start`` (a ``time.time()``), which leaves each
    process its start-up and ``warmup``. ``wait`` merges their rows into one."""

    START_UP_S = 3.0  # Python, numpy and PIL imported (no torch: the images come from files)

    def __init__(self, url: str, clients: int, processes: int, seconds: float, warmup: float, image_dir: Path,
                 body: str = "multipart"):
        self.start = time.time() + self.START_UP_S + warmup
        self.seconds = seconds
        counts = [clients // processes + (i < clients % processes) for i in range(min(processes, clients))]
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "benchmarks.closed_loop", "--url", url, "--clients", str(count),
                              "--seconds", str(seconds), "--start-at", repr(self.start), "--images", str(image_dir),
                              "--body", body, "--latencies"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for count in counts]

    def wait(self) -> Dict[str, float]:
        timeout = self.start + self.seconds + 120 - time.time()
        try:
            outputs = [process.communicate(timeout=max(timeout, 1.0))[0] for process in self.processes]
        finally:
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        failed = [process.returncode for process in self.processes if process.returncode]
        if failed:
            raise RuntimeError(f"client processes exited with {failed} (their errors above)")
        return merge([json.loads(output) for output in outputs], self.seconds)


def fashion_pngs(count: int = 64) -> List[bytes]:
    """The first ``count`` Fashion-MNIST test images as PNG files (Debian's dataset-fashion-mnist)."""
    # Imported here: it imports torch, seconds of a client process's start-up that --images spares.
    from model.fashion_mnist import load_split

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
    parser.add_argument("--start-at", type=float, help="measure from this time.time() instead of after --warmup")
    parser.add_argument("--body", choices=["multipart", "json"], default="json")
    parser.add_argument("--images", type=Path, help="send the files of this folder (default: Fashion-MNIST PNGs)")
    parser.add_argument("--latencies", action="store_true", help="print every latency too (latencies_ms)")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.iterdir())] if args.images else fashion_pngs()
    row = asyncio.run(drive(args.url, args.clients, args.seconds, images, args.body, args.warmup, args.start_at,
                            args.latencies))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
