"""The engine's default thread count: every usable core but one, never fewer than one."""
import os

import pytest

from app.engine import default_model_threads


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (16, 15)])
def test_model_threads_leave_a_core_to_the_request_path(monkeypatch, cores: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_model_threads() == expected
