"""Our HaloAttention against timm's HaloAttn itself: same weights (loaded strictly), same outputs, same gradients."""
import pytest
import torch
from timm.layers.halo_attn import HaloAttn

from model import HaloAttention
from model.attention import BACKENDS

FP32_TOL = 1e-5

# Each case: constructor kwargs, input shape. Together they cover every constructor argument:
# stride 2 both ways (strided query blocks, and average pool by flag or by an odd block size),
# scale_pos_embed, qk_ratio, explicit dim_head (q/k width != v width both ways), qkv_bias,
# dim_out != dim, non-square maps, batch 1, halo 0, more than one image per call, narrow and wide heads.
CASES = [
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1), (2, 16, 8, 8)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=2), (1, 16, 12, 8)),
    (dict(dim=16, num_heads=4, block_size=4, halo_size=0), (1, 16, 8, 16)),
    (dict(dim=16, dim_out=32, num_heads=4, block_size=4, halo_size=1), (2, 16, 8, 12)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2), (2, 16, 8, 8)),
    (dict(dim=16, dim_out=24, num_heads=2, block_size=4, halo_size=2, stride=2), (1, 16, 16, 8)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True), (2, 16, 8, 12)),
    (dict(dim=16, num_heads=2, block_size=5, halo_size=1, stride=2), (1, 16, 10, 10)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, scale_pos_embed=True), (2, 16, 8, 8)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, scale_pos_embed=True), (1, 16, 8, 8)),
    (dict(dim=32, num_heads=2, block_size=4, halo_size=1, qk_ratio=0.5), (1, 32, 8, 8)),
    (dict(dim=16, num_heads=2, dim_head=12, block_size=4, halo_size=1), (1, 16, 8, 8)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, qkv_bias=True), (2, 16, 8, 8)),
    (dict(dim=16, num_heads=2, block_size=8, halo_size=3), (1, 16, 16, 24)),
    (dict(dim=64, num_heads=8, block_size=8, halo_size=3, stride=2), (2, 64, 16, 16)),
    # Maps of one block: most of the window is zero padding; narrow and wide heads, stride 2 both ways.
    (dict(dim=16, num_heads=2, block_size=8, halo_size=3), (2, 16, 8, 8)),
    (dict(dim=64, num_heads=2, block_size=4, halo_size=2, stride=2, scale_pos_embed=True), (1, 64, 4, 4)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, qkv_bias=True, dim_head=12), (2, 16, 4, 4)),
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True), (2, 16, 4, 4)),
    (dict(dim=32, num_heads=2, block_size=2, halo_size=3, qk_ratio=0.5), (3, 32, 2, 2)),
    # Wide heads (> 16): the fused path builds position logits another way for them.
    (dict(dim=64, num_heads=2, block_size=4, halo_size=2), (2, 64, 8, 12)),
    (dict(dim=64, num_heads=2, block_size=4, halo_size=1, stride=2, scale_pos_embed=True), (1, 64, 8, 8)),
    # A window wider than one 16-float vector, and query blocks of 9 queries (the C++ kernel's
    # vector and register tiles do not divide them).
    (dict(dim=16, num_heads=2, block_size=12, halo_size=3), (1, 16, 24, 12)),
    (dict(dim=16, num_heads=2, block_size=6, halo_size=2, stride=2), (2, 16, 12, 18)),
    # v heads of 6 channels (q/k: 8): value widths that the kernel's 4-channel tiles do not divide.
    (dict(dim=12, num_heads=2, block_size=4, halo_size=1), (2, 12, 8, 8)),
]
IDS = [f"case{i}" for i in range(len(CASES))]


def make_pair(kwargs: dict, backend: str, seed: int = 0) -> tuple[HaloAttn, HaloAttention]:
    torch.manual_seed(seed)
    theirs = HaloAttn(**kwargs)
    if kwargs.get("qkv_bias"):  # timm leaves biases at zero: give them values that matter
        with torch.no_grad():
            theirs.q.bias.normal_()
            theirs.kv.bias.normal_()
    ours = HaloAttention(**kwargs, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kwargs,shape", CASES, ids=IDS)
def test_forward_matches_timm(backend: str, kwargs: dict, shape: tuple) -> None:
    theirs, ours = make_pair(kwargs, backend)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, actual = theirs(x), ours(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= FP32_TOL


# The trainable backends: the compiled kernels have no backward, and forced while training they
# raise (test_attention_layer.py).
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("kwargs,shape", CASES, ids=IDS)
def test_gradients_match_timm(backend: str, kwargs: dict, shape: tuple) -> None:
    theirs, ours = make_pair(kwargs, backend)
    x = torch.randn(shape)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = theirs(x_theirs)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ours(x_ours).backward(upstream)
    assert (x_ours.grad - x_theirs.grad).abs().max().item() <= FP32_TOL
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        expected = theirs_grads[name]
        # Parameter gradients sum over every pixel: compare relative to their size.
        assert (p.grad - expected).abs().max().item() <= FP32_TOL * max(1.0, expected.abs().max().item()), name


def test_state_dict_keys_and_shapes_equal_timm() -> None:
    kwargs = dict(dim=32, dim_out=48, num_heads=4, block_size=4, halo_size=2, qk_ratio=0.5, qkv_bias=True)
    theirs, ours = HaloAttn(**kwargs), HaloAttention(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_timm_initialisation_statistics() -> None:
    """Fresh layers are initialised like timm's (truncated normal with the same stds)."""
    torch.manual_seed(0)
    ours = HaloAttention(dim=256, num_heads=8, block_size=8, halo_size=3)
    assert ours.q.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.1)
    assert ours.pos_embed.height_rel.std().item() == pytest.approx(32 ** -0.5, rel=0.1)
