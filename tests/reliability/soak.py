"""Soak test: the service (shipped default model) under mixed traffic for a long time, watched for
leaks, wrong answers and drifting latency.

Eight client threads, each with its own keep-alive connection, send request after another: images
of 28x28 to 512x512 pixels in PNG, JPEG and WebP, made from Fashion-MNIST test images (their labels
are known), one or several per request, multipart or JSON base64, some with heatmaps (array and
png). Every 20th request is a bad input (exactly 5%), rotating through the kinds in BAD_INPUTS,
each with the 4xx status and error code the README documents. Every 2 s the server process is
sampled from /proc: RSS, open fds, threads.

Rules (``SoakResult.violations``), judged after a warm-up of 10% of the duration or 30 s, whichever
is smaller (thread pools fill, allocators reach their working size):
  * every good request answered 200 with a correct answer, every bad one its documented status
    and code; no other status, no transport error: the error rate is exactly the bad-input rate.
    A correct answer has one result per image, top_k sorted scores of known labels, the heatmaps
    asked for, and the same top-1 label and score (within SCORE_TOLERANCE) as the first answer
    for the same image bytes;
  * RSS at the end of the load at most 5% or 50 MB (either suffices) above the first sample
    after the warm-up;
  * open fds and threads, sampled SETTLE_S after the clients closed their connections: fds at
    most FD_TOLERANCE above the sample of the idle server just before the load (like for like: the
    samples under load count the clients' keep-alive connections, which would hide as many leaked
    fds), threads at most THREAD_TOLERANCE above the first sample after the warm-up (the pools
    start their threads on first use);
  * the server stops on SIGTERM with exit status 0 (a clean drain);
  * latency stays flat: the last interval's p99 at most P99_FLAT_FACTOR times that of the first
    interval wholly after the warm-up. Intervals are a minute long, or a tenth of the duration
    for runs shorter than 10 minutes.

Writes report.json (every sample, per-interval percentiles, counts), soak.png and summary.md:

    python -m tests.reliability.soak --duration 1800 --report soak-report/
"""
import argparse
import base64
import io
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import httpx
import matplotlib
import numpy as np
from PIL import Image, ImageOps

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.server import ServerProcess  # noqa: E402
from model.fashion_mnist import load_split  # noqa: E402

CLIENTS = 8
BAD_EVERY = 20  # request numbers 19, 39, ... are bad inputs: 5% of the requests, runs end on a multiple of 20
SAMPLE_EVERY_S = 2.0
SETTLE_S = 2.0  # after the last connection closes, before sampling the idle server: the server sees it go
RSS_GROWTH_FRACTION = 0.05
RSS_GROWTH_BYTES = 50 * 2 ** 20
FD_TOLERANCE = 2  # sockets the server may not have closed yet
THREAD_TOLERANCE = 2
P99_FLAT_FACTOR = 2.0
# The same image bytes may run in batches of different sizes, traced or eager (heatmaps): float32
# sums in another order, not another answer.
SCORE_TOLERANCE = 1e-4
REQUEST_TIMEOUT_S = 60.0  # bounds each request, hence how long the clients take to stop
MAX_REQUESTS_PER_SECOND = 2000  # the default bound on the request count, far above what it answers (282/s seen)
FAILURE_EXAMPLES = 50
SIZES = [(28, 28), (64, 64), (96, 128), (224, 224), (320, 240), (512, 384), (512, 512)]
FORMATS = [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
POOL_IMAGES = 42  # every size in every format, twice


@dataclass
class PoolImage:
    id: int
    data: bytes
    b64: str
    mime: str
    name: str
    label: int  # Fashion-MNIST's


def make_pool(count: int = POOL_IMAGES) -> List[PoolImage]:
    """Fashion-MNIST test images, scaled into canvases of SIZES and saved in FORMATS. Every third is
    inverted (dark garment on light background) and RGB, which the service's preprocessing undoes."""
    images, labels = load_split("test")
    pool = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        fmt, mime = FORMATS[(i // len(SIZES)) % len(FORMATS)]
        garment = Image.fromarray(images[i].numpy())
        if (width, height) != (28, 28):
            side = int(min(width, height) * 0.9)
            canvas = Image.new("L", (width, height), 0)
            canvas.paste(garment.resize((side, side), Image.Resampling.BILINEAR),
                         ((width - side) // 2, (height - side) // 2))
            garment = canvas
        if i % 3 == 2:
            garment = ImageOps.invert(garment).convert("RGB")
        buffer = io.BytesIO()
        garment.save(buffer, format=fmt)
        data = buffer.getvalue()
        pool.append(PoolImage(i, data, base64.b64encode(data).decode(), mime, f"img{i}.{fmt.lower()}",
                              int(labels[i])))
    return pool


@dataclass
class Planned:
    """One request: httpx ``post`` arguments and what a right answer is."""
    kind: str
    kwargs: dict
    images: List[PoolImage] = field(default_factory=list)
    top_k: int = 0
    heatmap_format: Optional[str] = None
    status: int = 200
    code: Optional[str] = None  # the error code of a bad input


def _multipart(images: List[Tuple[str, bytes, str]], params: dict) -> dict:
    return dict(url="/predict", params=params, files=[("file", image) for image in images])


def _ppm(pool: List[PoolImage]) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(pool[0].data)).save(buffer, format="PPM")
    return buffer.getvalue()


# (name, status, error code, request arguments from the image pool and a seeded random generator)
BadInput = Tuple[str, int, str, Callable[[List[PoolImage], random.Random], dict]]
BAD_INPUTS: List[BadInput] = [
    ("garbage bytes", 400, "undecodable_image",
     lambda pool, rng: _multipart([("x.png", b"not an image" + rng.randbytes(200), "image/png")], {})),
    ("truncated png", 400, "undecodable_image",
     lambda pool, rng: _multipart([("x.png", pool[0].data[:len(pool[0].data) // 2], "image/png")], {})),
    ("empty file", 400, "empty_image", lambda pool, rng: _multipart([("x.png", b"", "image/png")], {})),
    ("invalid base64", 400, "invalid_base64",
     lambda pool, rng: dict(url="/predict", json={"images": ["@@not base64"]})),
    ("top_k 0", 422, "invalid_options", lambda pool, rng: _multipart([(p.name, p.data, p.mime) for p in pool[:1]],
                                                                       {"top_k": 0})),
    ("top_k above the class count", 422, "invalid_options",
     lambda pool, rng: dict(url="/predict", json={"images": [pool[1].b64], "top_k": 11})),
    ("unknown heatmap format", 422, "invalid_options",
     lambda pool, rng: _multipart([(p.name, p.data, p.mime) for p in pool[:1]],
                                  {"heatmaps": "true", "heatmap_format": "jpeg"})),
    ("unknown heatmap layer", 422, "invalid_options",
     lambda pool, rng: dict(url="/predict", json={"images": [pool[2].b64], "heatmaps": True,
                                                  "heatmap_layer": "no.such.layer"})),
    ("no file field", 422, "no_images", lambda pool, rng: dict(url="/predict", files=[("image", ("x.png", b"x"))])),
    ("malformed json", 422, "invalid_request",
     lambda pool, rng: dict(url="/predict", content=b'{"images": [', headers={"content-type": "application/json"})),
    ("text body", 415, "unsupported_media_type",
     lambda pool, rng: dict(url="/predict", content=b"hello", headers={"content-type": "text/plain"})),
    ("unsupported image format", 415, "unsupported_image_format",
     lambda pool, rng: _multipart([("x.ppm", _ppm(pool), "image/x-portable-pixmap")], {})),
    ("too many images", 413, "too_many_images",
     lambda pool, rng: dict(url="/predict", json={"images": [pool[0].b64] * 65})),
]
# Good requests: (kind, weight, images per request, JSON rather than multipart, heatmap format or None)
GOOD_MIX = [("1 image multipart", 40, (1, 1), False, None), ("1 image json", 20, (1, 1), True, None),
            ("2-4 images multipart", 10, (2, 4), False, None), ("2-4 images json", 10, (2, 4), True, None),
            ("heatmaps array", 10, (1, 1), False, "array"), ("heatmaps png", 10, (1, 2), True, "png")]


def plan(number: int, pool: List[PoolImage]) -> Planned:
    """Request ``number``, the same in every run: the random choices are seeded by it."""
    rng = random.Random(number)
    if number % BAD_EVERY == BAD_EVERY - 1:
        name, status, code, build = BAD_INPUTS[(number // BAD_EVERY) % len(BAD_INPUTS)]
        return Planned(f"bad: {name}", build(pool, rng), status=status, code=code)
    kind, _, (fewest, most), as_json, heatmap_format = rng.choices(GOOD_MIX, weights=[g[1] for g in GOOD_MIX])[0]
    images = rng.sample(pool, rng.randint(fewest, most))
    top_k = rng.randint(1, 5)
    options = dict(top_k=top_k, **({"heatmaps": True, "heatmap_format": heatmap_format} if heatmap_format else {}))
    if as_json:
        kwargs = dict(url="/predict", json={"images": [image.b64 for image in images], **options})
    else:
        params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in options.items()}
        kwargs = _multipart([(image.name, image.data, image.mime) for image in images], params)
    return Planned(kind, kwargs, images, top_k, heatmap_format)


class Tickets:
    """Request numbers 0, 1, 2, ... to the client threads, until the time is up or ``most`` are out;
    it closes only on a multiple of BAD_EVERY, so that bad inputs are exactly 1/BAD_EVERY of all."""

    def __init__(self, until: float, most: int):
        self.until, self.most, self.next = until, most, 0
        self._lock = threading.Lock()

    def take(self) -> Optional[int]:
        with self._lock:
            if self.next % BAD_EVERY == 0 and (time.monotonic() >= self.until or self.next >= self.most):
                return None
            self.next += 1
            return self.next - 1


@dataclass
class Outcome:
    number: int
    kind: str
    bad: bool
    sent_s: float  # since the load started
    latency_s: float
    status: Optional[int]  # None: no answer (transport error)
    verdict: str  # "answered" (good, right answer), "rejected" (bad, documented error), or what went wrong
    detail: str = ""


class AnswerChecker:
    """Checks answers; remembers the first top-1 of every pool image, which later answers must repeat."""

    def __init__(self, classes: List[str]):
        self.classes = set(classes)
        self.first: Dict[int, Tuple[str, float]] = {}
        self.largest_score_drift = 0.0
        self._lock = threading.Lock()

    def problem(self, planned: Planned, response: httpx.Response) -> Optional[str]:
        """What is wrong with the answer, or None."""
        try:
            return self._answer_problem(planned, response)
        except (ValueError, KeyError, TypeError, IndexError) as error:  # not JSON, or not the documented shape
            return f"status {response.status_code}, unreadable answer ({error!r}): {response.text[:200]}"

    def _answer_problem(self, planned: Planned, response: httpx.Response) -> Optional[str]:
        if planned.code is not None:
            code = response.json().get("error", {}).get("code") if response.status_code == planned.status else None
            return None if code == planned.code else f"status {response.status_code}: {response.text[:200]}"
        if response.status_code != 200:
            return f"status {response.status_code}: {response.text[:200]}"
        results = response.json()["results"]
        if len(results) != len(planned.images):
            return f"{len(results)} results for {len(planned.images)} images"
        for image, result in zip(planned.images, results):
            problem = self._result_problem(planned, image, result)
            if problem:
                return f"image {image.id}: {problem}"
        return None

    def _result_problem(self, planned: Planned, image: PoolImage, result: dict) -> Optional[str]:
        predictions = result["predictions"]
        scores = [p["score"] for p in predictions]
        if len(predictions) != planned.top_k or scores != sorted(scores, reverse=True):
            return f"not {planned.top_k} sorted scores: {scores}"
        if not {p["label"] for p in predictions} <= self.classes or not 0 <= scores[-1] <= scores[0] <= 1:
            return f"labels or scores out of range: {predictions}"
        heatmaps = result.get("heatmaps")
        if planned.heatmap_format is None and heatmaps is not None:
            return "heatmaps that were not asked for"
        if planned.heatmap_format == "array" and not (heatmaps and heatmaps["block_maps"] and heatmaps["image_map"]):
            return "no heatmap arrays"
        if planned.heatmap_format == "png" and not (heatmaps and all(
                base64.b64decode(heatmaps[key]).startswith(b"\x89PNG") for key in ("overlay_png", "mosaic_png"))):
            return "no heatmap pictures"
        top = (predictions[0]["label"], predictions[0]["score"])
        with self._lock:
            first = self.first.setdefault(image.id, top)
            drift = abs(top[1] - first[1])
            self.largest_score_drift = max(self.largest_score_drift, drift)
        if top[0] != first[0] or drift > SCORE_TOLERANCE:
            return f"top-1 {top} where the first answer for these bytes was {first}"
        return None


@dataclass
class Sample:
    t_s: float  # since the load started
    rss_bytes: int
    fds: int
    threads: int


def sample_process(pid: int, t_s: float) -> Sample:
    """RSS (VmRSS) and threads from /proc/<pid>/status, open fds from /proc/<pid>/fd."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    rss_kib = int(fields["VmRSS"].split()[0])
    return Sample(t_s, rss_kib * 1024, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


@dataclass
class Interval:
    start_s: float
    end_s: float
    requests: int  # good ones answered 200, whose latency is counted
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass
class SoakResult:
    duration_s: float
    warmup_s: float
    interval_s: float
    runtime_s: float
    ready_s: float  # from the server's start to /readyz answering 200
    stop_s: float  # from SIGTERM to its exit
    server_exit_code: Optional[int]
    requests: int
    bad_requests: int
    error_responses: int  # every non-200 answer and every request with no answer
    verdicts: Dict[str, int]
    by_kind: Dict[str, int]
    failures: List[Outcome]  # the first FAILURE_EXAMPLES
    largest_score_drift: float
    top1_matches_dataset: float  # share of the pool images whose top-1 is their Fashion-MNIST label
    idle_sample: Sample  # the ready server, just before the load
    samples: List[Sample]
    end_sample: Sample  # SETTLE_S after the clients stopped
    intervals: List[Interval]

    @property
    def baseline(self) -> Sample:
        """The first sample after the warm-up."""
        return next(s for s in self.samples if s.t_s >= self.warmup_s)

    @property
    def rss_growth_bytes(self) -> int:
        under_load = [s for s in self.samples if s.t_s <= self.duration_s]
        return under_load[-1].rss_bytes - self.baseline.rss_bytes

    @property
    def p99_reference(self) -> Interval:
        """The first interval wholly after the warm-up."""
        return next(i for i in self.intervals if i.start_s >= self.warmup_s)

    def violations(self) -> List[str]:
        """Every rule of the module docstring that the run broke, in words."""
        broken = []
        failed = self.requests - self.verdicts.get("answered", 0) - self.verdicts.get("rejected", 0)
        if failed:
            broken.append(f"{failed} requests with a wrong answer, an undocumented status or no answer")
        if self.error_responses != self.bad_requests or self.bad_requests * BAD_EVERY != self.requests:
            broken.append(f"error rate {self.error_responses}/{self.requests} is not the bad-input rate "
                          f"{self.bad_requests}/{self.requests} (1/{BAD_EVERY})")
        growth, start = self.rss_growth_bytes, self.baseline.rss_bytes
        if growth >= RSS_GROWTH_FRACTION * start and growth >= RSS_GROWTH_BYTES:
            broken.append(f"RSS grew {growth / 2 ** 20:.1f} MB ({growth / start:.1%}) after the warm-up")
        if self.end_sample.fds > self.idle_sample.fds + FD_TOLERANCE:
            broken.append(f"open fds {self.idle_sample.fds} before the load, {self.end_sample.fds} after it")
        if self.end_sample.threads > self.baseline.threads + THREAD_TOLERANCE:
            broken.append(f"threads {self.baseline.threads} after the warm-up, {self.end_sample.threads} at the end")
        last, reference = self.intervals[-1], self.p99_reference
        if not last.p99_ms <= P99_FLAT_FACTOR * reference.p99_ms:
            broken.append(f"p99 {last.p99_ms:.1f} ms in the last interval, over {P99_FLAT_FACTOR:g}x the "
                          f"{reference.p99_ms:.1f} ms of the first after the warm-up")
        if self.server_exit_code != 0:
            broken.append(f"the server exited with {self.server_exit_code} on SIGTERM")
        return broken


def intervals_of(outcomes: List[Outcome], duration_s: float, interval_s: float) -> List[Interval]:
    """Latency percentiles of the good requests answered 200, by when they were sent; the last
    interval also takes the requests sent after the duration (the run ends on a whole round)."""
    count = math.ceil(duration_s / interval_s - 1e-9)
    latencies: List[List[float]] = [[] for _ in range(count)]
    for outcome in outcomes:
        if not outcome.bad and outcome.status == 200:
            latencies[min(int(outcome.sent_s // interval_s), count - 1)].append(outcome.latency_s * 1e3)
    intervals = []
    for k, values in enumerate(latencies):
        p50, p95, p99 = np.percentile(values, [50, 95, 99]) if values else [float("nan")] * 3
        intervals.append(Interval(k * interval_s, min((k + 1) * interval_s, duration_s), len(values),
                                  float(p50), float(p95), float(p99)))
    return intervals


def _client(url: str, tickets: Tickets, pool: List[PoolImage], checker: AnswerChecker, started: float,
            outcomes: List[Outcome]) -> None:
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        while (number := tickets.take()) is not None:
            planned = plan(number, pool)
            sent = time.monotonic()
            try:
                response = http.post(**planned.kwargs)
                latency = time.monotonic() - sent
                status, problem = response.status_code, checker.problem(planned, response)
            except httpx.TransportError as error:
                latency = time.monotonic() - sent
                status, problem = None, f"{type(error).__name__}: {error}"
            verdict = "rejected" if planned.code else "answered"
            if problem:
                verdict = "no answer" if status is None else ("wrong answer" if status == 200 else "wrong status")
            outcomes.append(Outcome(number, planned.kind, planned.code is not None, sent - started, latency,
                                    status, verdict, problem or ""))


def _sampler(pid: int, started: float, stop: threading.Event, samples: List[Sample]) -> None:
    while True:
        samples.append(sample_process(pid, time.monotonic() - started))
        if stop.wait(SAMPLE_EVERY_S):
            return


def run(duration_s: float, report: Path, clients: int = CLIENTS, max_requests: Optional[int] = None) -> SoakResult:
    """Start the service, soak it for ``duration_s`` (or ``max_requests``, rounded up to a multiple of
    BAD_EVERY), stop it, and write the report into ``report``."""
    begun = time.monotonic()
    most = max_requests or int(MAX_REQUESTS_PER_SECOND * duration_s)
    most = math.ceil(most / BAD_EVERY) * BAD_EVERY
    pool = make_pool()
    # The shipped default model, whatever the calling shell's HALO_MODEL and HALO_CHECKPOINT say.
    launched = time.monotonic()
    server = ServerProcess({"HALO_MODEL": "halonet_compact", "HALO_CHECKPOINT": "", "HALO_THREADS": "1"})
    try:
        server.wait_ready()
        ready_s = time.monotonic() - launched
        classes = httpx.get(f"{server.url}/v1/model", timeout=10).json()["classes"]
        checker = AnswerChecker(classes)
        outcomes: List[Outcome] = []
        samples: List[Sample] = []
        stop_sampling = threading.Event()
        time.sleep(SETTLE_S)
        idle_sample = sample_process(server.process.pid, 0.0)
        started = time.monotonic()
        tickets = Tickets(started + duration_s, most)
        # Daemons: an interrupted run (Ctrl-C) stops the server in ``finally`` and exits, clients or not.
        sampler = threading.Thread(target=_sampler, args=(server.process.pid, started, stop_sampling, samples),
                                   daemon=True)
        threads = [threading.Thread(target=_client, args=(server.url, tickets, pool, checker, started, outcomes),
                                    daemon=True) for _ in range(clients)]
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop_sampling.set()
        sampler.join()
        time.sleep(SETTLE_S)
        end_sample = sample_process(server.process.pid, time.monotonic() - started)
    finally:
        stopping = time.monotonic()
        exit_code = server.stop()
        stop_s = time.monotonic() - stopping
    # A run that reached ``most`` before its time ended at its last request.
    run_s = duration_s if tickets.next < most else min(duration_s, max(o.sent_s for o in outcomes))
    top1 = {image_id: label for image_id, (label, _) in checker.first.items()}
    result = SoakResult(
        duration_s=run_s, warmup_s=min(run_s / 10, 30.0), interval_s=min(60.0, run_s / 10),
        runtime_s=time.monotonic() - begun, ready_s=ready_s, stop_s=stop_s, server_exit_code=exit_code,
        requests=len(outcomes), bad_requests=sum(o.bad for o in outcomes),
        error_responses=sum(o.status != 200 for o in outcomes),
        verdicts=_count(o.verdict for o in outcomes), by_kind=_count(o.kind for o in outcomes),
        failures=[o for o in outcomes if o.verdict not in ("answered", "rejected")][:FAILURE_EXAMPLES],
        largest_score_drift=checker.largest_score_drift,
        top1_matches_dataset=sum(classes.index(top1[p.id]) == p.label for p in pool if p.id in top1) / len(pool),
        idle_sample=idle_sample, samples=samples, end_sample=end_sample, intervals=[])
    result.intervals = intervals_of(outcomes, result.duration_s, result.interval_s)
    write_report(result, report)
    return result


def _count(values: Iterable[str]) -> Dict[str, int]:
    return dict(sorted(Counter(values).items()))


def summary(result: SoakResult) -> str:
    """The figures in Markdown."""
    base, end, last = result.baseline, result.end_sample, [s for s in result.samples if s.t_s <= result.duration_s][-1]
    mb = 2 ** 20
    lines = [
        f"# Soak test: {result.duration_s:.0f} s (warm-up {result.warmup_s:.0f} s), runtime {result.runtime_s:.0f} s",
        "",
        f"Server ready after {result.ready_s:.1f} s, stopped {result.stop_s:.1f} s after SIGTERM "
        f"(exit status {result.server_exit_code})",
        "",
        f"Requests: {result.requests} ({result.requests / result.duration_s:.1f}/s), bad inputs "
        f"{result.bad_requests}, error responses {result.error_responses}; outcomes: "
        + ", ".join(f"{k} {v}" for k, v in result.verdicts.items()),
        "",
        f"Largest top-1 score drift for the same image bytes: {result.largest_score_drift:.2e}; top-1 equal to "
        f"the Fashion-MNIST label for {result.top1_matches_dataset:.0%} of the {POOL_IMAGES} images",
        "",
        "| server | idle before load | after warm-up | end of load | clients stopped | peak after warm-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    after = [s for s in result.samples if s.t_s >= result.warmup_s]
    idle = result.idle_sample
    lines.append(f"| RSS MB | {idle.rss_bytes / mb:.1f} | {base.rss_bytes / mb:.1f} | {last.rss_bytes / mb:.1f} | "
                 f"{end.rss_bytes / mb:.1f} | {max(s.rss_bytes for s in after) / mb:.1f} |")
    for name in ("fds", "threads"):
        lines.append(f"| {name} | {getattr(idle, name)} | {getattr(base, name)} | {getattr(last, name)} | "
                     f"{getattr(end, name)} | {max(getattr(s, name) for s in after)} |")
    lines += ["", f"RSS growth after warm-up: {result.rss_growth_bytes / mb:+.1f} MB "
                  f"({result.rss_growth_bytes / base.rss_bytes:+.1%})", "",
              "| interval s | requests | p50 ms | p95 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i.start_s:.0f}-{i.end_s:.0f} | {i.requests} | {i.p50_ms:.1f} | {i.p95_ms:.1f} | {i.p99_ms:.1f} |"
              for i in result.intervals]
    violations = result.violations()
    lines += ["", "Rules: " + ("all hold" if not violations else "BROKEN"), *[f"- {v}" for v in violations]]
    lines += ["", *[f"- request {o.number} ({o.kind}): {o.verdict}, {o.detail}" for o in result.failures[:10]]]
    return "\n".join(lines).rstrip() + "\n"


def write_report(result: SoakResult, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps(
        {**asdict(result), "rss_growth_bytes": result.rss_growth_bytes, "violations": result.violations()}, indent=1))
    (report / "summary.md").write_text(summary(result))
    t = [s.t_s for s in result.samples]
    figure, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    series = [("RSS MB", [s.rss_bytes / 2 ** 20 for s in result.samples]),
              ("open fds", [s.fds for s in result.samples]), ("threads", [s.threads for s in result.samples])]
    for axis, (name, values) in zip(axes.flat, series):
        axis.plot(t, values)
        axis.set(ylabel=name, title=f"Server {name}")
    latency = axes.flat[3]
    middles = [(i.start_s + i.end_s) / 2 for i in result.intervals]
    for name in ("p50_ms", "p95_ms", "p99_ms"):
        latency.plot(middles, [getattr(i, name) for i in result.intervals], marker="o", label=name[:3])
    latency.set(ylabel="ms", title="Latency per interval (good requests)")
    latency.legend()
    for axis in axes.flat:
        axis.axvspan(0, result.warmup_s, color="0.9")  # the warm-up
    for axis in axes[1]:
        axis.set_xlabel("seconds since the load started")
    figure.tight_layout()
    figure.savefig(report / "soak.png", dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--report", type=Path, default=Path("soak-report"), help="folder of the report")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--max-requests", type=int, default=None,
                        help=f"stop earlier after this many (default {MAX_REQUESTS_PER_SECOND} per second)")
    args = parser.parse_args()
    result = run(args.duration, args.report, args.clients, args.max_requests)
    print(summary(result))
    sys.exit(1 if result.violations() else 0)


if __name__ == "__main__":
    main()
