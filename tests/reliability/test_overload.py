"""Traffic above capacity against a real server: it sheds (503 + Retry-After, decided before the
body is read) instead of queueing without bound, keeps serving at capacity within the deadline,
answers every request with its own result, and is back to normal latency soon after.

A model that dominates on this CPU (halonet26t, random weights, two single-thread workers), so
that a client in this process can offer several times what the server can do. Capacity: images/s
of a closed loop of 4 clients (enough to keep both workers busy), before, between and after the
overloads. Overload: Poisson arrivals at 2x and 4x the first, each on a connection of a pool, for
HALO_OVERLOAD_SECONDS (60 by default)."""
import asyncio
import io
import json
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model import create_model

pytestmark = pytest.mark.slow

DEADLINE_S, MAX_QUEUE_WAIT_S = 4.0, 2.0
OVERLOAD_S = float(os.environ.get("HALO_OVERLOAD_SECONDS", "60"))
SCORE_TOLERANCE = 1e-6
KEEP_ALIVE_S = 5  # the server's default
MOST_IN_FLIGHT = 1000  # the client's own bound: arrivals beyond it would be the client's failure


def photos() -> List[bytes]:
    """Eight different 64 x 64 colour pictures (stripes of varying pitch and hue)."""
    pictures = []
    for i in range(8):
        image = Image.new("RGB", (64, 64), (20 * i, 255 - 25 * i, 40 + 20 * i))
        for x in range(0, 64, 4 + i):
            image.paste((250 - 30 * i, 10 * i, 200), (x, 0, x + 2, 64))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pictures.append(buffer.getvalue())
    return pictures


@dataclass
class Answer:
    status_code: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class RawClient:
    """HTTP/1.1 over a pool of keep-alive connections, requests written as prepared bytes: the load
    generator shares the server's two cores, and httpx spent several times the CPU per request that
    the server spends refusing one, which counted against the server's goodput."""

    BOUNDARY = b"overload"

    def __init__(self, port: int):
        self.port = port
        self._idle: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def _connection(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection that the server has not closed and will not close under the request
        (its keep-alive timeout, HALO_KEEP_ALIVE_S, is 5 s), or a new one."""
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if not reader.at_eof() and time.monotonic() - idle_since < KEEP_ALIVE_S - 1:
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", self.port)

    def multipart(self, image: bytes) -> bytes:
        return (b"--" + self.BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + self.BOUNDARY + b"--\r\n")

    async def post(self, path: str, body: bytes, request_id: str) -> Answer:
        reader, writer = await self._connection()
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nX-Request-ID: %s\r\nContent-Type: multipart/form-data; "
                     b"boundary=%s\r\nContent-Length: %d\r\n\r\n" % (path.encode(), request_id.encode(), self.BOUNDARY,
                                                                     len(body)) + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
        answer = Answer(int(head[0].split()[1]), headers, await reader.readexactly(int(headers["content-length"])))
        if headers.get("connection") == "close":
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return answer

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()


@dataclass
class Tally:
    """What the overloaded server answered."""

    answered: List[float] = field(default_factory=list)  # latencies of the 200s
    statuses: Dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    shed_without_retry_after: int = 0

    def count(self, outcome: str) -> None:
        self.statuses[outcome] = self.statuses.get(outcome, 0) + 1


async def ask(http: RawClient, body: bytes) -> Tuple[Answer, float, str]:
    """``body``: an image as the client's multipart body."""
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    response = await http.post("/predict?top_k=2", body, request_id)
    return response, time.monotonic() - started, request_id


def top1(response: Answer) -> Tuple[int, float]:
    best = response.json()["results"][0]["predictions"][0]
    return best["index"], best["score"]


async def expected_answers(http: RawClient, bodies: List[bytes]) -> Tuple[Dict[int, Tuple[int, float]], float]:
    """Each body's top-1 asked alone, where its top two are far enough apart that batching
    (which moves these scores, about 1e-3 for random weights, by ~1e-10) cannot swap them; and the
    median latency of one request alone."""
    expected, alone = {}, []
    for _ in range(3):
        for i, body in enumerate(bodies):
            response, seconds, _ = await ask(http, body)
            assert response.status_code == 200, response.text
            first, second = response.json()["results"][0]["predictions"]
            if first["score"] - second["score"] > SCORE_TOLERANCE:
                expected[i] = (first["index"], first["score"])
            alone.append(seconds)
    return expected, statistics.median(alone)


async def capacity(http: RawClient, bodies: List[bytes], seconds: float = 12.0) -> float:
    """Images/s of 4 clients in a closed loop (after 3 s to settle)."""
    done, measure_from = [], time.monotonic() + 3
    until = measure_from + seconds

    async def client(k: int) -> None:
        n = 0
        while time.monotonic() < until and n < 10_000:
            response, _, _ = await ask(http, bodies[(k + n) % len(bodies)])
            assert response.status_code == 200, response.text
            if time.monotonic() >= measure_from:
                done.append(1)
            n += 1

    await asyncio.gather(*(client(k) for k in range(4)))
    return len(done) / seconds


async def overload(http: RawClient, bodies: List[bytes], rate: float, seconds: float,
                   expected: Dict[int, Tuple[int, float]]) -> Tally:
    tally, rng, tasks = Tally(), random.Random(int(rate)), set()

    async def one(i: int) -> None:
        try:
            response, latency, request_id = await ask(http, bodies[i])
        except (OSError, asyncio.IncompleteReadError) as error:
            tally.count(type(error).__name__)
            return
        tally.count(str(response.status_code))
        if response.headers.get("x-request-id") != request_id:
            tally.wrong += 1
        if response.status_code == 200:
            tally.answered.append(latency)
            if i in expected:
                index, score = top1(response)
                tally.wrong += index != expected[i][0] or abs(score - expected[i][1]) > SCORE_TOLERANCE
        elif response.status_code == 503 and "retry-after" not in response.headers:
            tally.shed_without_retry_after += 1

    until, n = time.monotonic() + seconds, 0
    while time.monotonic() < until:
        if len(tasks) >= MOST_IN_FLIGHT:
            pytest.fail(f"{len(tasks)} requests in flight: the server is not shedding")
        task = asyncio.create_task(one(n % len(bodies)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return tally


async def recovery_s(http: RawClient, body: bytes, normal_s: float) -> float:
    """From the end of the overload until one request alone is answered within 2x its latency alone."""
    started = time.monotonic()
    while time.monotonic() - started < 30:
        response, seconds, _ = await ask(http, body)
        if response.status_code == 200 and seconds <= 2 * normal_s:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return float("inf")


def test_overload_is_shed_and_what_is_accepted_is_answered_in_time_and_right(start_server, capsys, tmp_path) -> None:
    # Random weights drawn the same way every run, not at each start: how many images get a clear top-1
    # depends on them (3 of 8 in one CI run, under the 4 the check below needs; 7 of 8 with seed 1).
    # HALO_COMPILE=off: the shedding is what is tested, and compiling these weights costs half a minute.
    checkpoint = tmp_path / "halonet26t.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        save_file(create_model("halonet26t").state_dict(), checkpoint)
    server = start_server(HALO_MODEL="halonet26t", HALO_CHECKPOINT=str(checkpoint), HALO_COMPILE="off",
                          HALO_THREADS="0", HALO_MODEL_WORKERS="2",
                          HALO_MAX_BATCH_SIZE="4", HALO_REQUEST_TIMEOUT_MS=str(DEADLINE_S * 1000),
                          HALO_MAX_QUEUE_WAIT_MS=str(MAX_QUEUE_WAIT_S * 1000))

    async def main():
        http = RawClient(server.port)
        bodies = [http.multipart(body) for body in photos()]
        try:
            expected, alone_s = await expected_answers(http, bodies)
            # Capacity is measured before and after each overload, alternating (this machine is
            # noisy): each overload's goodput is set against the mean of its two neighbours.
            capacities, rows = [await capacity(http, bodies)], []
            for factor in (2, 4):
                tally = await overload(http, bodies, factor * capacities[0], OVERLOAD_S, expected)
                recovered_s = await recovery_s(http, bodies[0], alone_s)
                capacities.append(await capacity(http, bodies))
                rows.append((factor, tally, recovered_s, statistics.mean(capacities[-2:])))
            return expected, alone_s, capacities, rows
        finally:
            http.close()

    expected, alone_s, capacities, rows = asyncio.run(main())
    report = [f"\ncapacity {', '.join(f'{c:.1f}' for c in capacities)} images/s (4 clients, closed loop, before, "
              f"between and after); one request alone {alone_s * 1e3:.0f} ms; {len(expected)} of 8 images with a "
              "clear top-1"]
    checks = []
    for factor, tally, recovered_s, peak in rows:
        sent = sum(tally.statuses.values())
        goodput = sum(1 for latency in tally.answered if latency <= DEADLINE_S) / OVERLOAD_S
        p99 = statistics.quantiles(tally.answered, n=100)[98] if len(tally.answered) > 1 else float("inf")
        report.append(f"{factor}x ({factor * capacities[0]:.1f}/s for {OVERLOAD_S:.0f} s): {sent} requests "
                      f"{tally.statuses}; goodput {goodput:.1f}/s ({goodput / peak:.0%} of the capacity around it), "
                      f"accepted p99 {p99:.2f} s, wrong answers {tally.wrong}, back to normal {recovered_s:.1f} s "
                      "after")
        checks.append((tally, goodput, peak, p99, recovered_s))
    with capsys.disabled():  # the figures, in the run's output
        print("\n".join(report))
    assert len(expected) >= 4, "too few images with a clear top-1 to check answers against"
    for tally, goodput, peak, p99, recovered_s in checks:
        assert set(tally.statuses) <= {"200", "503", "504"}, tally.statuses
        assert tally.statuses.get("503", 0) > 0 and tally.shed_without_retry_after == 0
        assert tally.wrong == 0
        assert goodput >= 0.9 * peak
        assert p99 <= DEADLINE_S
        assert recovered_s <= 5
