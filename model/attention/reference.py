"""Reference halo attention: the exact math, written to be read, not to be fast.

It materializes every block's key/value window and the full attention matrix, like timm's
``HaloAttn``, and can return the attention probabilities (heatmaps and tests use them).
Every fast backend is tested against this file.

Shapes: B batch, N query blocks (row-major), Q queries per block, K keys per window.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import HaloSpec, HaloWeights, square_coordinates


def relative_position_index(query_block_size: int, win_size: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Index into ``height_rel`` / ``width_rel`` for every (query, key) pair of a block, (Q, K) each.

    A query at row ``qy`` of its (possibly downsampled) block and a key at row ``ky`` of the
    window use ``height_rel[ky - qy + win_size - 1]``; columns likewise. This is what timm's
    pad-and-reshape ``rel_logits_1d`` computes.
    """
    qy, qx = square_coordinates(query_block_size, device)
    ky, kx = square_coordinates(win_size, device)
    height_index = ky[None, :] - qy[:, None] + win_size - 1
    width_index = kx[None, :] - qx[:, None] + win_size - 1
    return height_index, width_index


def queries_and_windows(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tuple[Tensor, Tensor, Tensor]:
    """Each block's queries (B, heads, N, Q, dk) and its window's keys (B, heads, N, K, dk) and values
    (B, heads, N, K, dv), materialized (the GPU benchmark's stock-op baseline starts from them too)."""
    B, _, H, W = x.shape
    heads, dk, dv = spec.num_heads, spec.dim_head_qk, spec.dim_head_v
    bs, bq, win = spec.block_size, spec.query_block_size, spec.win_size
    nh, nw = H // bs, W // bs

    q = F.conv2d(x, weights.q_weight, weights.q_bias, stride=spec.block_stride)
    q = q.reshape(B, heads, dk, nh, bq, nw, bq).permute(0, 1, 3, 5, 4, 6, 2).reshape(B, heads, nh * nw, bq * bq, dk)

    kv = F.conv2d(x, weights.kv_weight, weights.kv_bias)
    # Zero-padded halo: keys outside the map are zero vectors but keep their position logit.
    kv = F.pad(kv, [spec.halo_size] * 4).unfold(2, win, bs).unfold(3, win, bs)  # B, C, nh, nw, win, win
    kv = kv.reshape(B, heads, dk + dv, nh * nw, win * win).permute(0, 1, 3, 4, 2)
    k, v = kv.split([dk, dv], dim=-1)
    return q, k, v


def position_logits(q: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """The relative-position logits (..., N, Q, K) of queries q (..., N, Q, dk), unscaled."""
    height_index, width_index = relative_position_index(spec.query_block_size, spec.win_size, q.device)
    return (torch.einsum("...nqd,qkd->...nqk", q, weights.height_rel[height_index])
            + torch.einsum("...nqd,qkd->...nqk", q, weights.width_rel[width_index]))


def halo_attention(
        x: Tensor, weights: HaloWeights, spec: HaloSpec, return_probs: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Halo attention of ``x`` (B, dim, H, W) -> (B, heads * dim_head_v, H / block_stride, W / block_stride).

    With ``return_probs`` also returns the attention probabilities (B, heads, N, Q, K); else None.
    The 2x2 average pool of ``avg_pool`` layers is the module's job, not the backend's.
    """
    B, _, H, W = x.shape
    heads, dv, bs, bq = spec.num_heads, spec.dim_head_v, spec.block_size, spec.query_block_size
    nh, nw = H // bs, W // bs

    q, k, v = queries_and_windows(x, weights, spec)
    rel_logits = position_logits(q, weights, spec)
    logits = q @ k.transpose(-1, -2)
    if spec.scale_pos_embed:
        logits = (logits + rel_logits) * spec.scale
    else:
        logits = logits * spec.scale + rel_logits
    probs = logits.softmax(dim=-1)

    out = (probs @ v).reshape(B, heads, nh, nw, bq, bq, dv)  # from B, heads, N, Q, dv
    out = out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, heads * dv, nh * bq, nw * bq)
    return out, (probs if return_probs else None)
