"""The engine's default thread count: every usable core but one, never fewer than one; every core
for a model whose forward dominates the request path."""
import os

import pytest

from app.engine import MODEL_BOUND_FORWARD_S, default_model_threads


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (16, 15)])
def test_model_threads_leave_a_core_to_the_request_path(monkeypatch, cores: int, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_model_threads() == expected


@pytest.mark.parametrize("forward_s, expected",
                         [(None, 3), (MODEL_BOUND_FORWARD_S / 4, 3), (MODEL_BOUND_FORWARD_S * 2, 4)])
def test_a_model_bound_forward_gets_every_core(monkeypatch, forward_s, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert default_model_threads(forward_s) == expected
