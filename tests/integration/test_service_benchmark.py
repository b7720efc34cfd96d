"""benchmarks/service.py against a real server: every figure of a row is measured, none made up."""
from pathlib import Path

import pytest

from benchmarks.capacity import autoscaling_target, measure
from benchmarks.closed_loop import fashion_pngs
from benchmarks.server import ServerProcess
from benchmarks.service import run_mode, sample_images

pytestmark = pytest.mark.slow


def test_a_benchmark_row_reads_throughput_batches_forward_time_and_cpu_from_the_server(tmp_path: Path) -> None:
    for index, image in enumerate(sample_images((1, 32, 32), 4)):
        (tmp_path / str(index)).write_bytes(image)
    # Five clients in two processes (3 + 2) that measure one window, their rows merged.
    (row,) = run_mode("on", {"HALO_THREADS": "1", "HALO_MAX_BATCH_SIZE": "8"}, [5], 2.0, tmp_path,
                      client_processes=2, warmup=0.5)
    assert row["concurrency"] == 5 and row["errors"] == 0 and row["requests"] > 10
    # The clients' images/s against the server's own count over the same window: they differ by the
    # answers on their way at either end and by what is served while a metrics page is read (tens of ms).
    assert row["served_images_per_s"] == pytest.approx(row["images_per_s"], rel=0.1)
    assert 1.0 <= row["mean_batch"] <= 5.0  # five clients with one image each: never more in a batch
    assert row["forward_ms_per_batch"] > 0
    assert row["server_cpu_ms_per_request"] > 0 and row["client_cpu_ms_per_request"] > 0
    assert row["client_busiest_process_cpu"] > 0
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert "latencies_ms" not in row  # the merged row keeps the percentiles, not the samples


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
