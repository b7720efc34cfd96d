"""The GPU benchmark's stock-op baseline computes the same attention, so its timing is a fair one."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.attention import _unfolded_sdpa_inputs
from model import HaloAttention
from model.attention import compatible_backends, reference


def test_unfolded_sdpa_baseline_matches_reference() -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        q, k, v, mask = _unfolded_sdpa_inputs(layer, x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.spec.scale)
        _, probs = reference.halo_attention(x, layer.weights(), layer.spec, return_probs=True)
    # The reference's probabilities applied to the baseline's values give the baseline's output.
    assert (out - probs.flatten(0, 1) @ v).abs().max().item() <= 1e-5


def test_gpu_table_runs_end_to_end(capsys) -> None:
    """Smoke run of the GPU benchmark's code path on CPU (Triton interpreted), one tiny shape."""
    from benchmarks.attention import LayerShape, run_gpu

    shape = LayerShape("tiny", 16, 16, 2, 2, 8, 4, 1, 8, 8)
    result = run_gpu([shape], batch=1, dtypes=[torch.float32], rounds=1, min_seconds=0.0, peak_gbs=100.0,
                     peak_tflops=2.0, device="cpu")
    row, out = result["rows"][0], capsys.readouterr().out
    assert row["max_abs_err"]["triton"] <= 1e-5 and row["max_abs_err"]["fused"] <= 1e-5
    assert row["kernel_gbs"] > 0 and "of 100 GB/s datasheet peak" in out
    # The roofline, printed before the timed rows: the given ceilings, then each scope's cost and bound.
    assert "roofline ceilings on cpu: given 100 GB/s, 2 TFLOP/s" in out
    roofline_line = next(line for line in out.splitlines() if line.startswith(shape.label()))
    assert roofline_line.count("GFLOP") == 2 and roofline_line.count("memory") == 2  # both scopes, memory-bound
    assert out.index("roofline ceilings") < out.index("timm ") < out.index("of bound: kernel")
    for scope in ("kernel_cost", "layer_cost"):
        cost = row[scope]
        assert cost["binds"] == "memory" and cost["bound_ms"] == cost["bytes"] / 100e9 * 1e3
        assert cost["intensity"] == cost["flops"] / cost["bytes"]
    assert row["kernel_fraction_of_bound"] == row["kernel_cost"]["bound_ms"] / row["triton_kernel_ms"]
    for name in ("triton", "fused", "timm"):
        assert row[f"{name}_fraction_of_bound"] == row["layer_cost"]["bound_ms"] / row[f"{name}_ms"]
    summary = result["summary"]["float32"]
    assert summary["largest_fraction_of_peak"] == pytest.approx(row["kernel_gbs"] / 100)  # GB/s * 1e9 / 1e11: rounds
    assert summary["largest_fraction_of_measured_bandwidth"] is None  # nothing measured on a CPU
    assert result["ceilings"]["float32"] == dict(bandwidth_gbs=100.0, tflops=2.0, source="given")


def test_cpu_table_runs_end_to_end(monkeypatch, capsys) -> None:
    """Smoke run of the CPU table on one tiny timm-shaped layer: rows, ratios and what auto ran."""
    import benchmarks.attention as bench
    from benchmarks.attention import LayerShape

    shape = LayerShape("tiny", 16, 16, 1, 2, 8, 4, 1, 8, 8)
    monkeypatch.setattr(bench, "timm_layer_shapes", lambda model_name: [shape])
    result = bench.run_cpu([1], "auto", rounds=1, min_seconds=0.0, models=("tiny",))
    row = result["rows"][0]
    assert row["max_abs_err"] <= 1e-5 and row["speedup"] > 0 and row["fused_speedup"] > 0
    auto = "cpp" if "cpp" in compatible_backends(torch.zeros(1, 16, 8, 8)) else "fused"  # without g++: fused
    assert result["resolved_backends"] == [auto] and f"ours ran: {auto}" in capsys.readouterr().out
