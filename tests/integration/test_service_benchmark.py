"""benchmarks/service.py against a real server: every figure of a row is measured, none made up."""
from typing import Dict, List

import pytest

from benchmarks import service
from benchmarks.capacity import autoscaling_target, measure
from benchmarks.closed_loop import fashion_pngs
from benchmarks.server import ServerProcess, read_metric
from benchmarks.service import run_mode, sample_images

pytestmark = pytest.mark.slow


def test_a_benchmark_row_reads_throughput_batches_forward_time_and_cpu_from_the_server(monkeypatch) -> None:
    served: List[float] = []  # images the server itself counted while the clients ran
    client_drive = service.drive

    async def drive_counted_by_the_server(url: str, *args, **kwargs) -> Dict[str, float]:
        before = read_metric(url, "halo_images_total")
        row = await client_drive(url, *args, **kwargs)
        served.append(read_metric(url, "halo_images_total") - before)
        return row

    monkeypatch.setattr(service, "drive", drive_counted_by_the_server)
    (row,) = run_mode("on", {"HALO_THREADS": "1", "HALO_MAX_BATCH_SIZE": "8"}, [4], 2.0, sample_images(4))
    assert row["errors"] == 0 and row["requests"] > 10
    # The client's images/s against the server's own count: they differ only by the answers on
    # their way when the clients stopped (at most one per client of the four).
    assert served[0] - 4 <= row["images_per_s"] * 2.0 <= served[0]
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
