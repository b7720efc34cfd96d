"""The soak test (tests/reliability/soak.py) for the CI's duration: HALO_SOAK_SECONDS, 180 s unless
set (``make soak`` runs the long one)."""
import os
from pathlib import Path

import pytest

from model import fashion_mnist
from tests.reliability import soak

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fashion_mnist.is_available(),
                                                   reason="needs Fashion-MNIST (dataset-fashion-mnist)")]
SECONDS = float(os.environ.get("HALO_SOAK_SECONDS", "180"))


def test_the_service_holds_steady_under_mixed_traffic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = soak.run(SECONDS, tmp_path)
    with capsys.disabled():  # the figures, in the run's output
        print(soak.summary(result))
    for name in ("report.json", "soak.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert result.duration_s == SECONDS, "the request bound ended the run early"
    assert result.requests > 10 * SECONDS, "too few requests for the figures to mean anything"
    assert result.bad_requests * soak.BAD_EVERY == result.requests
    assert result.violations() == []
