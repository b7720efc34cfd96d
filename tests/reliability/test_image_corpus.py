"""Every file of the hostile image corpus (image_corpus.py) posted to /predict: each answered with one of
the answers it allows (200, or its documented 4xx and error code; never a 5xx) within SECONDS_PER_IMAGE,
the process no more than RSS_GROWTH_MB bigger after the whole corpus, and a normal image still answered
200 afterwards. The cases run and the count of each answer are written to the terminal."""
import time
from collections import Counter

import psutil
import pytest

import tests.api.conftest as api
from tests.api.conftest import image_bytes

from .image_corpus import image_corpus

client = api.client  # the API tests' app (random weights, 1 MP and 2 MB limits), found by pytest by its name

SECONDS_PER_IMAGE = 2.0  # on a slow shared machine; the costliest cases take about 0.3 s
RSS_GROWTH_MB = 150  # measured: about 40


def _post(client, name: str, data: bytes):
    return client.post("/predict", files=[("file", (name, data, "application/octet-stream"))])


def _answer(response) -> str:
    return "ok" if response.status_code == 200 else f"{response.status_code} {response.json()['error']['code']}"


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the corrupt EXIF the corpus holds
def test_every_corpus_file_gets_an_answer_it_allows_in_time_and_memory(client, capsys: pytest.CaptureFixture) -> None:
    cases = image_corpus()
    assert _post(client, "warm-up.png", image_bytes()).status_code == 200  # pools and allocators started
    process = psutil.Process()
    rss_before = process.memory_info().rss
    answers: Counter = Counter()
    failures, seconds_of = [], {}
    for case in cases:
        started = time.perf_counter()
        response = _post(client, case.name, case.data)
        seconds = seconds_of[case.name] = time.perf_counter() - started
        answer = _answer(response)
        answers[answer] += 1
        if answer not in case.expected:
            allowed = " or ".join(sorted(case.expected))
            failures.append(f"{case.name}: {answer} ({response.text[:200]}), expected {allowed}")
        if seconds > SECONDS_PER_IMAGE:
            failures.append(f"{case.name}: {seconds:.2f} s, over {SECONDS_PER_IMAGE} s")
    slowest = max(seconds_of, key=seconds_of.get)
    growth_mb = (process.memory_info().rss - rss_before) / 2 ** 20
    summary = (f"image corpus: {len(cases)} cases, " + ", ".join(f"{n} {a}" for a, n in sorted(answers.items()))
               + f"; RSS {growth_mb:+.0f} MB; slowest: {slowest} ({seconds_of[slowest]:.2f} s)")
    with capsys.disabled():
        print(f"\n{summary}")
    assert not failures, "\n".join([summary, *failures])
    assert growth_mb <= RSS_GROWTH_MB, summary
    assert _post(client, "after.png", image_bytes()).status_code == 200
