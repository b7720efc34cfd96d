"""benchmarks/peers.py's summary: each server's round means, and ours against each peer round by round."""
import pytest

from benchmarks.peers import SERVERS, summarize


def test_summary_compares_the_same_round_of_the_same_model_and_level() -> None:
    rows = []
    for server, images_per_s, p50, p99 in (("halonet-serve", (300, 340), 10, (15, 25)),
                                           ("halonet-serve-fixed", (320, 320), 10, (20, 20)),
                                           ("litserve", (200, 200), 20, (40, 40)),
                                           ("naive", (100, 150), 40, (80, 120))):
        for round_ in (0, 1):
            rows.append(dict(model="m", concurrency=32, server=server, round=round_, images_per_s=images_per_s[round_],
                             p50_ms=p50, p95_ms=p50, p99_ms=p99[round_]))
    rows += [dict(r, concurrency=8) for r in rows]  # another level, summarized on its own
    (level32, level8) = summarize(rows)
    assert set(level32["means"]) == set(SERVERS) and level32["concurrency"] == 32 and level8["concurrency"] == 8
    assert level32["means"]["naive"]["images_per_s"] == pytest.approx(125)
    assert level32["throughput_over_litserve"] == pytest.approx((300 / 200 * 340 / 200) ** 0.5)
    # round by round (x3.0, x2.27), not over the round means (320 / 125 = x2.56)
    assert level32["throughput_over_naive"] == pytest.approx((300 / 100 * 340 / 150) ** 0.5)
    assert level32["p50_over_litserve"] == pytest.approx(0.5)
    assert level32["p99_over_naive"] == pytest.approx((15 / 80 * 25 / 120) ** 0.5)
    assert level32["p99_over_p50"] == pytest.approx(2.0)  # of our round means
    assert level32["throughput_over_halonet-serve-fixed"] == pytest.approx((300 / 320 * 340 / 320) ** 0.5)
