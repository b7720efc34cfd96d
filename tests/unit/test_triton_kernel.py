"""The Triton kernel against the reference: on CPU through Triton's interpreter at small sizes,
on a GPU (when there is one) at the real halonet sizes and in fp16/bf16."""
import pytest
import torch

from model import HaloAttention
from model.attention import reference, triton as triton_kernel

pytestmark = pytest.mark.skipif(triton_kernel.triton is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Small shapes that still exercise every code path of the kernel: several query tiles per block
# (block 10 -> 100 queries > 64), partial key tiles, halos 0 to 4 (odd and even), every stride
# mode, q/k narrower and wider than v, non-square maps.
SMALL = [
    dict(dim=16, num_heads=2, block_size=4, halo_size=1),
    dict(dim=16, num_heads=2, block_size=4, halo_size=3),
    dict(dim=16, num_heads=2, block_size=4, halo_size=0),
    dict(dim=16, num_heads=2, block_size=10, halo_size=2),
    dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2),
    dict(dim=16, num_heads=2, block_size=8, halo_size=3, stride=2),
    dict(dim=16, num_heads=2, block_size=4, halo_size=2, stride=2, avg_down=True),
    dict(dim=16, num_heads=2, block_size=4, halo_size=1, scale_pos_embed=True),
    dict(dim=32, num_heads=2, block_size=4, halo_size=1, qk_ratio=0.5),
    dict(dim=16, num_heads=2, dim_head=24, block_size=4, halo_size=4),
]


def run_both(kwargs: dict, shape: tuple, dtype: torch.dtype = torch.float32, channels_last: bool = False):
    torch.manual_seed(0)
    layer = HaloAttention(**kwargs).to(DEVICE).eval()
    x = torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        expected, expected_probs = reference.halo_attention(x, layer.weights(), layer.spec, return_probs=True)
        expected_maps = expected_probs.mean(dim=(1, 3)).unflatten(-1, (layer.spec.win_size,) * 2)
        layer = layer.to(dtype)
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, maps = triton_kernel.halo_attention_and_maps(x, layer.weights(), layer.spec)
    return out, maps, expected, expected_maps


@pytest.mark.parametrize("kwargs", SMALL, ids=[f"small{i}" for i in range(len(SMALL))])
def test_small_shapes_match_reference_fp32(kwargs: dict) -> None:
    bs = kwargs["block_size"]
    out, maps, expected, expected_maps = run_both(kwargs, (2, kwargs["dim"], 2 * bs, 3 * bs))
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5
    assert (maps - expected_maps).abs().max().item() <= 1e-6


def test_channels_last_input_gives_channels_last_output() -> None:
    kwargs = dict(dim=16, num_heads=2, block_size=4, halo_size=1)
    out, _, expected, _ = run_both(kwargs, (2, 16, 8, 12), channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - expected).abs().max().item() <= 1e-5


# The halo attention layers of halonet_h1 at 256 px and batch 8 (stage by stage).
REAL = [
    (dict(dim=64, num_heads=8, block_size=8, halo_size=3), (8, 64, 64, 64)),
    (dict(dim=128, num_heads=8, block_size=8, halo_size=3, stride=2), (8, 128, 64, 64)),
    (dict(dim=256, num_heads=8, block_size=8, halo_size=3), (8, 256, 16, 16)),
    (dict(dim=512, num_heads=8, block_size=8, halo_size=3), (8, 512, 8, 8)),
    (dict(dim=384, num_heads=8, block_size=12, halo_size=2, stride=2), (8, 384, 48, 48)),
]
# fp16/bf16 outputs are compared with the fp32 reference, relative to the output's scale.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs,shape", REAL, ids=[f"real{i}" for i in range(len(REAL))])
def test_real_shapes_on_gpu(kwargs: dict, shape: tuple, dtype: torch.dtype) -> None:
    out, maps, expected, expected_maps = run_both(kwargs, shape, dtype)
    scale = expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() <= TOLERANCE[dtype] * scale
    assert (maps - expected_maps).abs().max().item() <= TOLERANCE[dtype]


@on_gpu
def test_auto_picks_triton_on_cuda_for_inference() -> None:
    layer = HaloAttention(dim=64, num_heads=8).cuda()
    x = torch.randn(1, 64, 16, 16, device="cuda")
    with torch.no_grad():
        assert layer.backend_for(x) == "triton"
