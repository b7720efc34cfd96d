"""Images small on the wire and huge decoded (a 6000 x 6000 all-black PNG: 36 Mpx in about 100 KB):
refused from their headers when a request holds too many pixels, refused with 503 when decoding is
full, never holding the decoding threads while an ordinary request waits; memory goes back after."""
import io
import threading
import time
from pathlib import Path
from typing import List

import httpx
import pytest
from PIL import Image

from benchmarks.closed_loop import fashion_pngs

pytestmark = pytest.mark.slow


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def black_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_huge_decodes_are_bounded_and_do_not_hold_up_ordinary_requests(start_server, capsys) -> None:
    server = start_server()
    bomb = black_png(6000)
    assert len(bomb) < 200_000
    idle_mb = rss_mb(server.process.pid)
    statuses: List[int] = []
    ordinary: List[float] = []
    stop = threading.Event()

    def send(images: int) -> None:
        response = httpx.post(f"{server.url}/predict", files=[("file", ("b.png", bomb))] * images, timeout=120)
        statuses.append(response.status_code)

    def ordinary_client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set() and len(ordinary) < 2000:
                started = time.monotonic()
                assert http.post("/predict", files=[("file", ("f.png", fashion_pngs()[0]))]).status_code == 200
                ordinary.append(time.monotonic() - started)
                time.sleep(0.05)

    watcher = threading.Thread(target=ordinary_client)
    watcher.start()
    try:
        started = time.monotonic()
        sixteen = [threading.Thread(target=send, args=(16,)) for _ in range(4)]  # 576 Mpx each
        for thread in sixteen:
            thread.start()
        for thread in sixteen:
            thread.join()
        refused_s = time.monotonic() - started
        refused, statuses[:] = list(statuses), []
        pairs = [threading.Thread(target=send, args=(2,)) for _ in range(4)]  # 72 Mpx each
        for thread in pairs:
            thread.start()
        peak_mb = idle_mb
        while any(thread.is_alive() for thread in pairs):
            peak_mb = max(peak_mb, rss_mb(server.process.pid))
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
    after_mb = rss_mb(server.process.pid)
    with capsys.disabled():  # the figures, in the run's output
        print(f"\n4 requests of 16 x 36 Mpx: {refused} in {refused_s:.2f} s; 4 of 2 x 36 Mpx at once: "
              f"{sorted(statuses)}; an ordinary request meanwhile: worst {max(ordinary) * 1e3:.0f} ms of "
              f"{len(ordinary)}; RSS idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB, after {after_mb:.0f} MB")
    assert refused == [413] * 4 and refused_s < 5
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
    assert max(ordinary) < 1.0
    assert peak_mb - idle_mb < 1000 and after_mb - idle_mb < 300
