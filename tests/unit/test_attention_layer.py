"""HaloAttention's own contract: errors, backend choice, probabilities, and every backend against
reference on random configs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import HaloAttention
from model.attention import BACKENDS, reference


def test_map_not_multiple_of_block_size_is_a_value_error() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="not a multiple of the block size 4"):
        layer(torch.randn(1, 8, 8, 10))


def test_wrong_channel_count_is_a_value_error() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 8, H, W\)"):
        layer(torch.randn(1, 6, 8, 8))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=8, num_heads=3), "divisible by num_heads"),
    (dict(dim=8, num_heads=2, stride=3), "stride must be 1 or 2"),
    (dict(dim=8, num_heads=2, backend="fastest"), "unknown halo attention backend 'fastest'"),
])
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HaloAttention(**kwargs)


def test_triton_on_cpu_fails_loudly_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1, backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match="'triton' is not available: it needs a CUDA tensor"):
        layer(torch.randn(1, 8, 8, 8))


def test_auto_resolves_to_fused_on_cpu_when_training() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
    assert layer.backend == "auto"
    assert layer.backend_for(torch.randn(1, 8, 8, 8)) == "fused"  # inference picks cpp: test_cpp_kernel.py


def test_triton_routes_training_through_fused() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1, backend="triton")
    x = torch.randn(1, 8, 8, 8)
    assert layer.backend_for(x) == "fused"  # parameters require grad
    with torch.no_grad():
        assert layer.backend_for(x) == "triton"  # emulated by the interpreter in tests


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_probabilities_are_a_distribution_over_each_window(stride: int) -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=1, stride=stride)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        out, probs = reference.halo_attention(x, layer.weights(), layer.spec, return_probs=True)
        expected = layer(x)
    q_block = 4 // stride
    assert probs.shape == (2, 2, 2 * 3, q_block ** 2, 6 ** 2)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    assert (layer.pool(out) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "fused", "triton"])
def test_window_maps_average_probabilities_over_heads_and_queries(backend: str) -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=1, backend=backend)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        out, maps = layer.forward_with_maps(x)
        _, probs = reference.halo_attention(x, layer.weights(), layer.spec, return_probs=True)
        expected = layer(x)
    assert maps.shape == (2, 6, 6, 6)
    assert (maps - probs.mean(dim=(1, 3)).view(2, 6, 6, 6)).abs().max().item() <= 1e-6
    assert torch.allclose(maps.sum(dim=(-1, -2)), torch.ones(()), atol=1e-6)
    assert (out - expected).abs().max().item() <= 1e-5


def test_zero_padded_keys_keep_their_position_logit() -> None:
    """Keys in the halo outside the map are zero vectors but still get probability mass."""
    torch.manual_seed(0)
    layer = HaloAttention(dim=8, num_heads=1, block_size=4, halo_size=2)
    with torch.no_grad():
        _, maps = layer.forward_with_maps(torch.randn(1, 8, 4, 4))
    # One block: its window is the map plus a 2-pixel zero halo; the two rows above the map get mass.
    assert maps[0, 0, :2, :].sum().item() > 0


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8, 20]),
    block=st.sampled_from([2, 3, 4]),
    halo=st.integers(0, 3),
    blocks_h=st.integers(1, 3),
    blocks_w=st.integers(1, 3),
    batch=st.integers(1, 3),
    stride=st.sampled_from([1, 2]),
    avg_down=st.booleans(),
    scale_pos_embed=st.booleans(),
    qkv_bias=st.booleans(),
)
def test_every_backend_matches_reference_on_random_configs(
        heads, head_dim, block, halo, blocks_h, blocks_w, batch, stride, avg_down, scale_pos_embed, qkv_bias) -> None:
    dim = heads * head_dim
    torch.manual_seed(0)
    layer = HaloAttention(dim=dim, num_heads=heads, block_size=block, halo_size=halo, stride=stride,
                          avg_down=avg_down, scale_pos_embed=scale_pos_embed, qkv_bias=qkv_bias)
    if qkv_bias:
        with torch.no_grad():
            layer.q.bias.normal_()
            layer.kv.bias.normal_()
    x = torch.randn(batch, dim, blocks_h * block, blocks_w * block)
    outputs = {}
    with torch.no_grad():
        for name in BACKENDS:
            layer.set_backend(name)
            outputs[name] = layer(x)
    for name, output in outputs.items():
        assert (output - outputs["reference"]).abs().max().item() <= 1e-5, name
