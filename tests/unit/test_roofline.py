"""The roofline's analytic FLOPs and bytes against what the layer's tensors and PyTorch's FLOP counter say."""
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.roofline import (Ceilings, Cost, bound_seconds, datasheet_ceilings, halo_layer_cost,
                                 measure_bandwidth, measure_flop_rate)
from model import HaloAttention
from model.attention import reference

# (HaloAttention arguments, feature map height and width): stride 1 and 2 (strided queries, and the average
# pool of avg_down layers and of odd blocks), halo 0 and more, qk_ratio 1 and 0.5 (dim_head_qk != dim_head_v).
GEOMETRIES = [
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1), (8, 12)),
    (dict(dim=16, dim_out=32, num_heads=4, block_size=4, halo_size=2, stride=2), (8, 8)),
    (dict(dim=24, num_heads=2, block_size=4, halo_size=0), (8, 8)),
    (dict(dim=16, num_heads=2, block_size=8, halo_size=3, stride=2, qk_ratio=0.5), (16, 16)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, qk_ratio=0.5, avg_down=True), (8, 8)),
    (dict(dim=8, num_heads=1, block_size=3, halo_size=1, stride=2), (6, 9)),
]
BATCH = 2


def _counted(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _layer(kwargs: Dict[str, object], size: Tuple[int, int], dtype: torch.dtype = torch.float32
           ) -> Tuple[HaloAttention, torch.Tensor]:
    torch.manual_seed(0)
    layer = HaloAttention(**kwargs, backend="reference").eval().to(dtype)
    return layer, torch.randn(BATCH, kwargs["dim"], *size, dtype=dtype)


@pytest.mark.parametrize("kwargs, size", GEOMETRIES)
def test_flops_match_what_the_reference_runs(kwargs: Dict[str, object], size: Tuple[int, int]) -> None:
    layer, x = _layer(kwargs, size)
    spec, w = layer.spec, layer.weights()
    flops = halo_layer_cost(spec, kwargs["dim"], *size, BATCH, x.element_size()).flops
    with torch.no_grad():
        q = reference.queries_and_windows(x, w, spec)[0]
        total = _counted(lambda: reference.halo_attention(x, w, spec))
        projections = _counted(lambda: reference.queries_and_windows(x, w, spec))
        per_key_position = _counted(lambda: reference.position_logits(q, w, spec))
    assert projections == flops.projections
    # The reference's matmuls are the projections, q.k, p.v and its position logits; the softmax is not counted.
    assert total - projections - per_key_position == flops.qk + flops.pv
    # Its position logits differ by design: it gathers each key's table rows and dots them with the query
    # (win^2 keys, two tables), the kernel dots the query with the 2*win-1 rows once (the next test).
    win = spec.win_size
    assert per_key_position * (2 * win - 1) == flops.position * win * win


@pytest.mark.parametrize("kwargs, size", GEOMETRIES)
def test_position_tables_give_the_reference_logits_at_the_analytic_cost(kwargs: Dict[str, object],
                                                                        size: Tuple[int, int]) -> None:
    """The kernel's way: q against each table's 2*win-1 offsets, then a gather per key. It must give the
    reference's position logits, and cost what the analytic count says."""
    layer, x = _layer(kwargs, size)
    spec, w = layer.spec, layer.weights()
    with torch.no_grad():
        q = reference.queries_and_windows(x, w, spec)[0]  # (B, heads, blocks, queries, dk)
        with FlopCounterMode(display=False) as counter:
            q_height, q_width = q @ w.height_rel.t(), q @ w.width_rel.t()
        # Each (query, key) pair's offset row, (queries, keys), broadcast over images, heads and blocks.
        rows, cols = reference.relative_position_index(spec.query_block_size, spec.win_size, q.device)
        gathered = (torch.take_along_dim(q_height, rows[None, None, None], dim=-1)
                    + torch.take_along_dim(q_width, cols[None, None, None], dim=-1))
        assert (gathered - reference.position_logits(q, w, spec)).abs().max().item() <= 1e-5
    assert counter.get_total_flops() == halo_layer_cost(spec, kwargs["dim"], *size, BATCH, 4).flops.position


@pytest.mark.parametrize("kwargs, size", GEOMETRIES)
def test_bytes_count_each_tensor_once(kwargs: Dict[str, object], size: Tuple[int, int]) -> None:
    """In bfloat16, so that the element size is the tensors' own, not float32's."""
    layer, x = _layer(kwargs, size, torch.bfloat16)
    spec, w = layer.spec, layer.weights()
    cost = halo_layer_cost(spec, kwargs["dim"], *size, BATCH, x.element_size())
    with torch.no_grad():
        q_proj = F.conv2d(x, w.q_weight, stride=spec.block_stride)
        kv_proj = F.conv2d(x, w.kv_weight)
        attended = reference.halo_attention(x, w, spec)[0]  # before the module's average pool
        out = layer(x)

    def size_of(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    assert cost.kernel.bytes == size_of(q_proj, kv_proj, w.height_rel, w.width_rel, attended)
    assert cost.layer.bytes == size_of(x, *layer.parameters(), out)


def test_bound_is_the_slower_side() -> None:
    cost = Cost(flops=10 ** 12, bytes=10 ** 9)
    assert bound_seconds(cost, Ceilings(bandwidth=1e12, flop_rate=2e15)) == (pytest.approx(1e-3), "memory")
    assert bound_seconds(cost, Ceilings(bandwidth=2e12, flop_rate=1e15)) == (pytest.approx(1e-3), "compute")
    assert cost.intensity == 1000


def test_datasheet_lead_by_device_name_with_overrides() -> None:
    assert datasheet_ceilings("NVIDIA H100 PCIe") == Ceilings(2000e9, 756e12)
    assert datasheet_ceilings("NVIDIA H100 NVL") == Ceilings(3900e9, 835e12)
    assert datasheet_ceilings("NVIDIA H100 80GB HBM3") == Ceilings(3350e9, 989e12)  # the SXM's name
    assert datasheet_ceilings("NVIDIA H200", bandwidth_gbs=4000) == Ceilings(4000e9, 989e12)
    assert datasheet_ceilings("cpu") is None and datasheet_ceilings("cpu", bandwidth_gbs=100) is None
    assert datasheet_ceilings("cpu", bandwidth_gbs=100, tflops=2) == Ceilings(100e9, 2e12)


def test_ceilings_are_measured_on_any_device() -> None:
    """On a GPU they run at full size; here only that they run and give rates."""
    assert measure_bandwidth("cpu", elements=1 << 16, rounds=1, min_seconds=0.0) > 0
    assert measure_flop_rate(torch.float32, "cpu", side=64, rounds=1, min_seconds=0.0) > 0
