"""The engine's default parallelism: every usable core but one for one model worker, never fewer
than one thread; one single-thread worker per core for a model whose forward dominates the request
path; the settings' choices kept."""
import os

import pytest
import torch

from app.engine import default_parallelism


@pytest.fixture
def cores(monkeypatch):
    def set_cores(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)
    return set_cores


@pytest.mark.parametrize("count, expected", [(1, (1, 1)), (2, (1, 1)), (16, (1, 15))])
def test_one_worker_leaves_a_core_to_the_request_path(cores, count: int, expected) -> None:
    cores(count)
    assert default_parallelism(model_bound=False) == expected


@pytest.mark.parametrize("count, expected", [(1, (1, 1)), (2, (2, 1)), (4, (4, 1))])
def test_a_model_bound_model_gets_a_single_thread_worker_per_core(cores, count: int, expected) -> None:
    cores(count)
    assert default_parallelism(model_bound=True) == expected


@pytest.mark.parametrize("model_bound, workers, threads, expected", [
    (True, 0, 3, (1, 3)),  # threads alone: one worker with them
    (True, 2, 0, (2, 2)),  # workers alone share every core
    (False, 2, 0, (2, 1)),  # ... or every core but one
    (False, 3, 2, (3, 2)),  # both given: as given
])
def test_the_settings_choices_are_kept(cores, model_bound: bool, workers: int, threads: int, expected) -> None:
    cores(4)
    assert default_parallelism(model_bound, workers, threads) == expected


@pytest.fixture(scope="module")
def traced_and_eager():
    from app.config import Settings
    from app.engine import Engine
    return (Engine(Settings(threads=1, model_workers=1, warmup=False)),
            Engine(Settings(threads=1, model_workers=1, warmup=False, graph="eager")))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_the_traced_graph_answers_as_the_eager_model_bit_for_bit(traced_and_eager, batch: int) -> None:
    traced, eager = traced_and_eager
    assert traced.graph is not None and eager.graph is None
    images = torch.randn(batch, *traced.cfg.input_size, generator=torch.Generator().manual_seed(batch))
    assert torch.equal(traced.forward(images, [None] * batch)[0], eager.forward(images, [None] * batch)[0])


def test_rows_with_heatmaps_get_the_eager_maps_and_the_others_the_graphs_answers(traced_and_eager) -> None:
    traced, eager = traced_and_eager
    layer = traced.default_heatmap_layer
    images = torch.randn(3, *traced.cfg.input_size, generator=torch.Generator().manual_seed(7))
    probs, maps = traced.forward(images, [None, layer, None])
    eager_probs, eager_maps = eager.forward(images, [None, layer, None])
    assert torch.equal(probs, eager_probs) and torch.equal(maps[1], eager_maps[1])
    assert maps[0] is None and maps[2] is None


def test_the_warm_up_returns_the_seconds_of_each_batch_size(traced_and_eager) -> None:
    traced, _ = traced_and_eager
    seconds = traced.warmup()
    assert sorted(seconds) == [1, 2, 4, 8, 16, 32] and all(s > 0 for s in seconds.values())
