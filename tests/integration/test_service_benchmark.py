"""benchmarks/service.py against a real server: every figure of a row is measured, none made up."""
import pytest

from benchmarks.capacity import autoscaling_target, measure
from benchmarks.closed_loop import fashion_pngs
from benchmarks.server import ServerProcess
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


def test_the_capacity_benchmark_samples_the_images_in_flight_and_derives_the_target_from_them() -> None:
    server = ServerProcess({"HALO_THREADS": "1"})
    try:
        server.wait_ready()
        row = measure(server, 4, 2.0, fashion_pngs(8))
    finally:
        server.stop()
    assert row["errors"] == 0 and 0 < row["in_flight"] <= 4  # four clients, one image each
    target = autoscaling_target([row, {**row, "concurrency": 8, "images_per_s": 1e6, "p99_ms": 1e9}], row["p99_ms"])
    assert target["clients_at_capacity"] == 4  # the faster level missed the p99
    assert target["hpa_target"] == max(1, round(row["in_flight"] * 0.7))
    assert autoscaling_target([row], row["p99_ms"] / 2) == {}
