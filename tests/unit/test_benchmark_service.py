"""benchmarks/service.py without a server: its options per device, and the merge of the rows of
client processes (benchmarks/closed_loop.py) that measured one window."""
import numpy as np
import pytest
import torch

from benchmarks.closed_loop import merge
from benchmarks.service import parse_args


def process_row(clients: int, latencies_ms: list, cpu_s: float, errors: int = 0) -> dict:
    return dict(concurrency=clients, requests=len(latencies_ms), errors=errors, latencies_ms=latencies_ms,
                client_cpu_s=cpu_s)


def test_merged_percentiles_are_over_every_latency_not_an_average_of_percentiles() -> None:
    fast = list(np.linspace(1.0, 2.0, 900))  # one process saw 900 fast answers
    slow = list(np.linspace(50.0, 60.0, 100))  # the other, 100 slow ones
    row = merge([process_row(3, fast, 0.5), process_row(2, slow, 0.2, errors=1)], seconds=10.0)
    everything = fast + slow
    assert row["p50_ms"] == pytest.approx(np.percentile(everything, 50))
    assert row["p95_ms"] == pytest.approx(np.percentile(everything, 95))
    assert row["p99_ms"] == pytest.approx(np.percentile(everything, 99))
    # An average of the two processes' p50 would be ~28 ms: no request took that long.
    assert row["p50_ms"] < 2.0 and row["p99_ms"] > 50.0
    assert row["concurrency"] == 5 and row["requests"] == 1000 and row["errors"] == 1
    assert row["images_per_s"] == pytest.approx(100.0)
    assert row["client_cpu_ms_per_request"] == pytest.approx(0.7 / 1000 * 1e3)
    assert row["client_busiest_process_cpu"] == pytest.approx(0.05)  # 0.5 s of CPU in 10 s


def test_a_merge_without_answers_has_no_percentiles() -> None:
    row = merge([process_row(1, [], 0.1, errors=3)], seconds=1.0)
    assert np.isnan(row["p50_ms"]) and row["requests"] == 0 and row["errors"] == 3


def test_device_cuda_without_a_gpu_is_an_argparse_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err


def test_defaults_per_device(monkeypatch) -> None:
    cpu = parse_args([])
    assert (cpu.concurrency, cpu.client_processes, cpu.model, cpu.dtype, cpu.modes) == (
        [1, 4, 16, 32, 64], 1, None, None, ["on", "off"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = parse_args(["--device", "cuda"])
    assert (cuda.concurrency, cuda.client_processes, cuda.model, cuda.dtype, cuda.modes) == (
        [1, 32, 128], 4, "halonet26t", "float16", ["on"])
    chosen = parse_args(["--device", "cuda", "--dtype", "bfloat16", "--concurrency", "64", "--client-processes", "2"])
    assert (chosen.dtype, chosen.concurrency, chosen.client_processes) == ("bfloat16", [64], 2)
