"""The CUDA serving path: buckets, padding, when a graph is captured and replayed, and the fallback
when a capture fails. On CPU with a stand-in for the capture (the runner's logic is the same on
every device); on a GPU, when there is one, with real CUDA graphs, the engine in float16 included."""
import logging
import threading
from typing import Callable, List

import pytest
import torch
from torch import Tensor

from model.cuda_runner import DeviceRunner, bucket_for, bucket_sizes

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("max_batch, expected", [
    (1, [1]), (2, [1, 2]), (5, [1, 2, 3, 4, 5]), (20, [1, 2, 3, 4, 6, 8, 12, 16, 20]),
    (32, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]), (64, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])])
def test_buckets_are_powers_of_two_and_their_halfway_sizes_up_to_the_largest_batch(max_batch: int, expected) -> None:
    assert bucket_sizes(max_batch) == expected


@pytest.mark.parametrize("max_batch", [7, 32, 100, 128])
def test_a_batch_is_padded_by_less_than_a_third_of_its_bucket(max_batch: int) -> None:
    buckets = bucket_sizes(max_batch)
    for size in range(1, max_batch + 1):
        bucket = bucket_for(size, buckets)
        assert size <= bucket and (bucket - size) * 3 < bucket
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket_for(max_batch + 1, buckets)


class Model:
    """A forward whose rows depend on their own input only, recording the batch sizes it ran."""

    def __init__(self) -> None:
        self.sizes: List[int] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.sizes.append(len(x))
        return torch.stack([x.flatten(1).sum(1), x.flatten(1).amax(1)], dim=1)


class StandInCapture:
    """What ``capture_cuda_graph`` promises, on CPU: a replay runs the forward again on what the static
    input holds then. Records the sizes captured; fails for the sizes in ``failing``."""

    def __init__(self, failing: tuple = ()) -> None:
        self.captured: List[int] = []
        self.failing = failing

    def __call__(self, forward: Callable[[Tensor], Tensor], static: Tensor) -> Callable[[], Tensor]:
        if len(static) in self.failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(len(static))
        output = forward(static)

        def replay() -> Tensor:
            output.copy_(forward(static))  # a graph writes into the same output tensor each time
            return output

        return replay


def images(count: int, seed: int) -> Tensor:
    return torch.randn(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def runner(model: Model, capture: StandInCapture, graphs: bool = True, max_batch: int = 8) -> DeviceRunner:
    return DeviceRunner(model, (3, 4, 4), max_batch, "cpu", graphs=graphs, capture=capture)


def test_a_bucket_runs_eagerly_on_its_whole_size_then_is_captured_then_replayed() -> None:
    model, capture = Model(), StandInCapture()
    run = runner(model, capture)
    for call, seed in enumerate(range(4)):
        batch = images(5, seed)
        assert torch.equal(run.run(batch), Model()(batch))  # the five images' answers, never the padding's
        assert capture.captured == ([] if call == 0 else [6])
    assert model.sizes[0] == 6  # the warm-up pass ran the padded bucket, as the capture will
    assert run.captured == [6]


def test_rows_given_as_a_list_and_stale_padding_give_each_images_own_answer() -> None:
    model, capture = Model(), StandInCapture()
    run = runner(model, capture)
    run.run(images(6, 0))
    run.run(images(6, 1))  # captured; the buffer now holds six images
    batch = images(5, 2)
    assert torch.equal(run.run(list(batch)), Model()(batch))  # the sixth row still holds the last batch's


def test_without_graphs_every_batch_runs_eagerly_on_its_own_images_only() -> None:
    model, capture = Model(), StandInCapture()
    run = runner(model, capture, graphs=False)
    for seed in range(3):
        batch = images(5, seed)
        assert torch.equal(run.run(batch), Model()(batch))
    assert model.sizes == [5, 5, 5] and capture.captured == [] and run.captured == []


def test_a_failed_capture_leaves_that_size_eager_for_good_and_says_so_once(caplog) -> None:
    model, capture = Model(), StandInCapture(failing=(6,))
    run = runner(model, capture)
    with caplog.at_level(logging.WARNING, logger="halo.cuda"):
        for seed in range(4):
            for count in (5, 2):  # buckets 6 (its capture fails) and 2
                batch = images(count, seed)
                assert torch.equal(run.run(batch), Model()(batch))
    failures = [r for r in caplog.records if "batch size 6 failed" in r.getMessage()]
    assert len(failures) == 1 and "RuntimeError" in failures[0].getMessage()
    assert run.captured == [2] and capture.captured == [2]
    assert [size for size in model.sizes if size > 2] == [6, 5, 5, 5]  # warm-up, then its own images only


def test_prepare_leaves_the_bucket_replaying() -> None:
    model, capture = Model(), StandInCapture()
    run = runner(model, capture, max_batch=32)
    for size in (1, 7, 32):
        run.prepare(size)
    assert run.captured == [1, 8, 32]


# On a GPU: real graphs.

@on_gpu
def test_a_real_cuda_graph_replays_the_forward_on_new_inputs() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).cuda().eval()
    run = DeviceRunner(lambda x: conv(x).mean(dim=(2, 3)), (3, 16, 16), 8, "cuda")
    for seed in range(4):
        batch = images(5, seed).repeat(1, 1, 4, 4)
        with torch.no_grad():
            expected = conv(batch.cuda()).mean(dim=(2, 3)).cpu()
        assert torch.allclose(run.run(list(batch)), expected, atol=1e-5)
    assert run.captured == [6]


@on_gpu
def test_a_forward_that_cannot_be_captured_runs_eagerly_and_the_device_goes_on(caplog) -> None:
    run = DeviceRunner(lambda x: x.flatten(1) * x.sum().item(), (3, 4, 4), 4, "cuda")  # .item() syncs: no capture
    with caplog.at_level(logging.WARNING, logger="halo.cuda"):
        for seed in range(3):
            batch = images(4, seed)
            assert torch.allclose(run.run(batch), batch.flatten(1) * batch.sum().item(), rtol=1e-5, atol=1e-5)
    assert run.captured == [] and any("runs eagerly" in r.getMessage() for r in caplog.records)
    assert torch.ones(2, device="cuda").sum().item() == 2


@on_gpu
@pytest.mark.parametrize("model", ["halonet_compact", "halonet26t"])
def test_the_engine_on_cuda_in_float16_answers_as_float32_on_cpu(model: str) -> None:
    from app.config import Settings
    from app.engine import Engine

    engines = []
    for device, dtype in (("cpu", "float32"), ("cuda", "float16")):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            engines.append(Engine(Settings(model=model, device=device, dtype=dtype, threads=1, max_batch_size=8,
                                           warmup=False)))
    cpu, cuda = engines
    assert cuda.attention_backends == ["triton"] and cuda.execution == "cuda_graphs" and cuda.workers == 2
    seconds = cuda.warmup()
    assert sorted(seconds) == [1, 2, 3, 4, 6, 8] and all(r.captured == sorted(seconds) for r in cuda.runners)
    batch = torch.randn(5, *cpu.cfg.input_size, generator=torch.Generator().manual_seed(1))
    expected = cpu.forward(batch, [None] * 5)[0]
    answers: List[Tensor] = []
    workers = [threading.Thread(target=lambda: answers.append(cuda.forward(list(batch), [None] * 5)[0]))
               for _ in range(4)]  # several workers' runners at once
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(answers) == 4
    for probs in answers:
        assert (probs - expected).abs().max().item() < 2e-2
        assert torch.equal(probs.argmax(1), expected.argmax(1))
    layer = cuda.default_heatmap_layer  # a batch with maps runs eagerly, beside the graphs
    probs, maps = cuda.forward(batch[:2], [layer, None])
    assert maps[0] is not None and maps[1] is None and (probs - expected[:2]).abs().max().item() < 2e-2
