"""The compiled CPU kernel (backend ``cpp``): layouts, real halonet shapes, extreme logits, and dispatch.

Its parity with timm over the whole argument grid is in test_attention_parity.py (every backend).
"""
import copy
import logging

import pytest
import torch

from model import HaloAttention
from model.attention import BackendUnavailable, cpp, reference


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    failure = cpp.load()
    assert failure is None, failure  # this machine has a compiler: the kernel must build


def run_cpp_and_reference(layer: HaloAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (cpp.halo_attention(x, layer.weights(), layer.spec),
                reference.halo_attention(x, layer.weights(), layer.spec)[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_keeps_the_input_memory_format(channels_last: bool) -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=32, num_heads=4, block_size=4, halo_size=2).eval()
    x = torch.randn(2, 32, 8, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, expected = run_cpp_and_reference(layer, x)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert (out - expected).abs().max().item() <= 1e-5


# The halonet_h1 layers at 256 px (benchmarks/attention.py times these): head widths 8 to 64,
# stride 1 and strided query blocks, maps of one block to 8x8 blocks.
H1_LAYERS = [(64, 32, 1), (128, 32, 2), (256, 16, 1), (256, 32, 2), (512, 8, 1), (512, 16, 2)]


@pytest.mark.parametrize("dim,size,stride", H1_LAYERS)
def test_halonet_h1_layer_shapes_match_reference(dim: int, size: int, stride: int) -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=dim, num_heads=8, block_size=8, halo_size=3, stride=stride).eval()
    out, expected = run_cpp_and_reference(layer, torch.randn(2, dim, size, size))
    assert (out - expected).abs().max().item() <= 1e-5


def test_large_logits_stay_finite_and_as_accurate_as_the_reference() -> None:
    """Logits of several hundred: exp overflows unless each row's maximum is subtracted, and at
    that size float32 rounding of the logits alone moves the output by about 1e-4. Against the
    float64 truth the kernel must be finite and at most twice as far off as the float32 reference."""
    torch.manual_seed(0)
    layer = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=2, scale_pos_embed=True).eval()
    with torch.no_grad():
        layer.q.weight.mul_(30)
        layer.pos_embed.height_rel.mul_(300)
    x = torch.randn(1, 16, 8, 8)
    out, expected = run_cpp_and_reference(layer, x)
    exact = copy.deepcopy(layer).double()
    with torch.no_grad():
        truth = reference.halo_attention(x.double(), exact.weights(), exact.spec)[0]
    assert torch.isfinite(out).all()
    reference_error = (expected.double() - truth).abs().max().item()
    assert (out.double() - truth).abs().max().item() <= 2 * max(reference_error, 1e-6)


def test_auto_runs_cpp_for_float32_inference_and_fused_otherwise() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert layer.backend_for(x) == "cpp"
        assert layer.double().backend_for(x.double()) == "fused"


def test_forced_cpp_refuses_other_dtypes() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1, backend="cpp").double()
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="'cpp' is not available: it supports float32 only"):
        layer(torch.randn(1, 8, 8, 8, dtype=torch.float64))


def test_a_kernel_that_cannot_be_built_is_reported_not_hidden(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    """No compiler: auto runs fused after one warning that says why; forcing cpp raises with the reason."""
    monkeypatch.setattr(cpp, "_loaded", False)
    monkeypatch.setattr(cpp, "_build_error", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: it has to compile
    x = torch.randn(1, 8, 8, 8)
    with caplog.at_level(logging.WARNING, logger=cpp.__name__), torch.no_grad():
        auto = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
        assert auto.backend_for(x) == "fused"
        assert auto.backend_for(x) == "fused"
        forced = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1, backend="cpp")
        with pytest.raises(BackendUnavailable, match="'cpp' is not available: could not build halo_attention.cpp"):
            forced(x)
    warnings = [r for r in caplog.records if "C++ kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1
