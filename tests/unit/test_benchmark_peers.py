"""benchmarks/peers.py's summary: ours against each peer from the means of the alternated rounds."""
import pytest

from benchmarks.peers import SERVERS, summarize


def test_summary_compares_round_means_of_the_same_model_and_level() -> None:
    rows = []
    for server, images_per_s, p50, p99 in (("halonet-serve", (300, 340), 10, (15, 25)),
                                           ("halonet-serve-adaptive", (320, 320), 10, (20, 20)),
                                           ("litserve", (200, 200), 20, (40, 40)),
                                           ("naive", (100, 150), 40, (80, 120))):
        for round_ in (0, 1):
            rows.append(dict(model="m", concurrency=32, server=server, round=round_, images_per_s=images_per_s[round_],
                             p50_ms=p50, p95_ms=p50, p99_ms=p99[round_]))
    rows += [dict(r, concurrency=8) for r in rows]  # another level, summarized on its own
    (level32, level8) = summarize(rows)
    assert set(level32["means"]) == set(SERVERS) and level32["concurrency"] == 32 and level8["concurrency"] == 8
    assert level32["throughput_over_litserve"] == pytest.approx(1.6)
    assert level32["throughput_over_naive"] == pytest.approx(320 / 125)
    assert level32["p50_over_litserve"] == pytest.approx(0.5) and level32["p99_over_naive"] == pytest.approx(0.2)
    assert level32["p99_over_p50"] == pytest.approx(2.0)
    assert level32["throughput_over_halonet-serve-adaptive"] == pytest.approx(1.0)
