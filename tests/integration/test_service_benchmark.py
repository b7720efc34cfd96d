"""benchmarks/service.py against a real server: every figure of a row is measured, none made up."""
import pytest

from benchmarks.service import run_mode, sample_images

pytestmark = pytest.mark.slow


def test_a_benchmark_row_reads_throughput_batches_forward_time_and_cpu_from_the_server() -> None:
    (row,) = run_mode("on", {"HALO_THREADS": "1", "HALO_MAX_BATCH_SIZE": "8"}, [4], 2.0, sample_images(4))
    assert row["errors"] == 0 and row["requests"] > 10
    assert row["images_per_s"] == pytest.approx(row["requests"] / 2.0, rel=0.3)
    assert 1.0 <= row["mean_batch"] <= 4.0  # four clients with one image each: never more in a batch
    assert row["forward_ms_per_batch"] > 0
    assert row["server_cpu_ms_per_request"] > 0 and row["client_cpu_ms_per_request"] > 0
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
