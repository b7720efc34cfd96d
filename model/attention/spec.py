"""What every halo attention backend needs to know: the layer's geometry and its weights.

Backends are plain functions ``(x, weights, spec) -> output``; the ``HaloAttention`` module
owns the parameters and hands them over in these two containers, so a backend never
depends on ``nn.Module`` internals. The helpers below are what several backends share.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class HaloSpec:
    """Geometry of one halo attention layer (the derived sizes follow timm's ``HaloAttn``)."""

    num_heads: int
    dim_head_qk: int
    dim_head_v: int
    block_size: int
    halo_size: int
    block_stride: int  # 2 for strided query blocks, else 1
    avg_pool: bool  # stride 2 done by a 2x2 average pool after attention
    scale_pos_embed: bool

    @property
    def win_size(self) -> int:
        """Side of the key/value window around each block: the block plus a halo on each side."""
        return self.block_size + 2 * self.halo_size

    @property
    def query_block_size(self) -> int:
        """Side of a query block after strided-query downsampling."""
        return self.block_size // self.block_stride

    @property
    def scale(self) -> float:
        return self.dim_head_qk ** -0.5


class HaloWeights(NamedTuple):
    """The layer's parameters, named after timm's state-dict keys."""

    q_weight: Tensor  # (heads * dim_head_qk, dim, 1, 1)
    q_bias: Optional[Tensor]
    kv_weight: Tensor  # (heads * (dim_head_qk + dim_head_v), dim, 1, 1); per head: k then v
    kv_bias: Optional[Tensor]
    height_rel: Tensor  # (2 * win_size - 1, dim_head_qk)
    width_rel: Tensor  # (2 * win_size - 1, dim_head_qk)


# Why a compiled kernel cannot run a call that needs gradients (their ``unavailable_reason`` says it).
NO_BACKWARD = "it has no backward pass; a call that needs gradients can run 'fused' (or 'reference')"


def square_coordinates(side: int, device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Row and column of each cell of a ``side`` x ``side`` square (a query block, a key window),
    cells in row-major order: two (side**2,) tensors."""
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return rows.flatten(), cols.flatten()


def empty_output(x: Tensor, spec: HaloSpec) -> Tensor:
    """The uninitialised output of attention over ``x`` (B, C, H, W): (B, heads * dim_head_v, H / block_stride,
    W / block_stride), in x's memory format (NCHW or channels_last), so that the layers after it read
    the layout they were given."""
    B, _, H, W = x.shape
    s = spec.block_stride
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(B, spec.num_heads * spec.dim_head_v, H // s, W // s, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def project_channels_last(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution as one matmul: (B, C, H, W) -> contiguous (B, H, W, C_out), reading x in place."""
    B, _, H, W = x.shape
    out = torch.matmul(x.flatten(2).transpose(1, 2), weight.flatten(1).t())
    if bias is not None:
        out = out + bias
    return out.view(B, H, W, -1)
