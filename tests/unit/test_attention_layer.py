"""HaloAttention's own contract: errors, backend choice, probabilities, and every backend against
reference on random configs."""
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from model import HaloAttention
from model.attention import BACKENDS, BackendUnavailable, compatible_backends, reference
from model.attention.spec import NO_BACKWARD


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
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="'triton' is not available: it needs a CUDA tensor"):
        layer(torch.randn(1, 8, 8, 8))


def test_auto_resolves_to_fused_on_cpu_when_training() -> None:
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1)
    assert layer.backend == "auto"
    assert layer.backend_for(torch.randn(1, 8, 8, 8)) == "fused"  # inference picks cpp: test_cpp_kernel.py


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_forced_kernel_refuses_a_call_that_needs_gradients(backend: str) -> None:
    """The compiled kernels have no backward: forced while training they raise, rather than run
    another backend; without gradients they run (triton emulated by the interpreter in tests)."""
    layer = HaloAttention(dim=8, num_heads=2, block_size=4, halo_size=1, backend=backend)
    x = torch.randn(1, 8, 8, 8)
    with pytest.raises(BackendUnavailable, match=re.escape(f"{backend!r} is not available: {NO_BACKWARD}")):
        layer(x)  # parameters require grad
    assert backend not in compatible_backends(x, needs_grad=True)
    with torch.no_grad():
        assert layer.backend_for(x) == backend and backend in compatible_backends(x)


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


def maps_by_definition(layer: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Per block (B, blocks, win, win): for each head and query, the softmax over the window of
    q.k * scale + q.height_rel[ky - qy + win - 1] + q.width_rel[kx - qx + win - 1] (keys outside the
    map are zero vectors), averaged over heads and queries; one query at a time, from the layer's
    own convolutions (a stride-1 layer)."""
    s, (height_rel, width_rel) = layer.spec, (layer.pos_embed.height_rel, layer.pos_embed.width_rel)
    bs, win, heads, dk = s.block_size, s.win_size, s.num_heads, s.dim_head_qk
    q, kv = layer.q(x), F.pad(layer.kv(x), [s.halo_size] * 4)
    blocks_h, blocks_w = x.shape[2] // bs, x.shape[3] // bs
    offsets = torch.arange(win)
    maps = torch.zeros(x.shape[0], blocks_h * blocks_w, win, win)
    for by in range(blocks_h):
        for bx in range(blocks_w):
            window = kv[:, :, by * bs:by * bs + win, bx * bs:bx * bs + win]
            for h in range(heads):
                keys = window[:, h * (dk + s.dim_head_v):h * (dk + s.dim_head_v) + dk]  # B, dk, win, win
                for qy in range(bs):
                    for qx in range(bs):
                        query = q[:, h * dk:(h + 1) * dk, by * bs + qy, bx * bs + qx]  # B, dk
                        logits = (torch.einsum("bd,bdyx->byx", query, keys) * s.scale
                                  + (query @ height_rel[offsets - qy + win - 1].t())[:, :, None]
                                  + (query @ width_rel[offsets - qx + win - 1].t())[:, None, :])
                        maps[:, by * blocks_w + bx] += logits.flatten(1).softmax(-1).view(-1, win, win)
    return maps / (heads * bs * bs)


@pytest.mark.parametrize("backend", ["reference", "fused", "triton"])
def test_window_maps_are_the_attention_probabilities_averaged_over_heads_and_queries(backend: str) -> None:
    torch.manual_seed(0)
    layer = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=1, backend=backend)
    x = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        out, maps = layer.forward_with_maps(x)
        expected_maps = maps_by_definition(layer, x)
        expected = layer(x)
    assert maps.shape == (2, 6, 6, 6)
    assert (maps - expected_maps).abs().max().item() <= 1e-6
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
