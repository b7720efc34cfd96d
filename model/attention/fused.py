"""Fast halo attention in PyTorch ops, for the CPU (and any device without a dedicated kernel).

Where timm's ``HaloAttn`` spends its time on a 2-core CPU: building the relative-position
logits through pads, reshapes and an expanded add over the full attention matrix, then
scaling, softmax and matmuls that each pass that matrix through memory, in tensors of tens
of MB whose fresh allocations are paid again in page faults. This path instead:

1. Works on a few images at a time and, within an image, on rows of blocks ("chunks" of about
   ``UNITS_PER_CHUNK`` block x head pairs), so intermediates stay small and cache-sized.
2. Runs the projections as plain matmuls straight into channels-last layout, where each
   block's key/value window is a strided view of the zero-padded projection; the windows are
   copied once per chunk, into exactly the layout attention reads.
3. Hands attention to PyTorch's fused ``scaled_dot_product_attention`` (on CPU a flash kernel
   that keeps logits and softmax in cache), with the relative-position logits as its additive
   mask. The mask is built by one matmul per chunk, never by a pass over an expanded tensor:
   for narrow heads against per-query-position key tables (``_position_keys``), for wide heads
   by reading the height and width logits out of ``q @ [height_rel; width_rel].T`` through
   strided views (``_relative_logits``).

All ops are differentiable, so the layer stays trainable on this path.
"""
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import relative_position_index
from .spec import HaloSpec, HaloWeights, empty_output, project_channels_last

# Block x head pairs per chunk, chosen by measurement on the halonet shapes: 128 against 64 is
# 5% faster over the halonet_h1 rows (up to 17% on the 64x64 and 32x32 maps, fewer ops per
# image), within 3% either way on the small maps; at batch 8, 256 is mixed and 512 20-75% slower
# (docs/performance.md).
UNITS_PER_CHUNK = 128


def _chunks(batch: int, block_rows: int, units_per_row: int) -> Iterator[Tuple[slice, range]]:
    """(images, block-row ranges): several whole images when they are small, else row ranges of one."""
    rows = max(1, UNITS_PER_CHUNK // units_per_row)
    images = max(1, rows // block_rows)
    for b in range(0, batch, images):
        yield slice(b, b + images), range(0, block_rows, min(rows, block_rows))


def _position_keys(weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """(Q, K, dk): for each query position of a block, the position embedding of each window key.

    Query (qy, qx) and key (ky, kx) add ``height_rel[ky - qy + win - 1] + width_rel[kx - qx + win - 1]``,
    so a query's position logits are one matmul of the query with its own (K, dk) slice.
    """
    height_index, width_index = relative_position_index(spec.query_block_size, spec.win_size, weights.height_rel.device)
    bq, win = spec.query_block_size, spec.win_size
    height = weights.height_rel[height_index.view(bq, bq, win, win)[:, 0, :, 0]]  # bq (qy), win (ky), dk
    width = weights.width_rel[width_index.view(bq, bq, win, win)[0, :, 0, :]]  # bq (qx), win (kx), dk
    keys = height[:, None, :, None, :] + width[None, :, None, :, :]  # qy, qx, ky, kx, dk
    if spec.scale_pos_embed:  # SDPA scales q.k but not the mask: scale the position logits here
        keys = keys * spec.scale
    return keys.view(bq * bq, win * win, -1)


def _relative_logits(q: Tensor, rel_table: Tensor, win: int) -> Tensor:
    """Position logits (..., bq*bq, win*win) of queries q (..., bq, bq, dk) through one small matmul.

    ``rel_table`` stacks height_rel over width_rel. The height logit of query row qy for key row
    ky sits ``ky - qy + win - 1`` entries into the query's row of ``q @ rel_table.T``: a strided view.
    """
    rel_size = 2 * win - 1
    rel = torch.matmul(q, rel_table.t())  # ..., bq, bq, 2 * rel_size; fresh and contiguous
    st = rel.stride()
    shape = rel.shape[:-1] + (win,)
    rel_h = rel.as_strided(shape, st[:-3] + (st[-3] - 1, st[-2], 1), rel.storage_offset() + win - 1)
    rel_w = rel.as_strided(shape, st[:-3] + (st[-3], st[-2] - 1, 1), rel.storage_offset() + rel_size + win - 1)
    return (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-4, -3).flatten(-2)


# Up to this head width the position logits are cheapest as one matmul against per-query-position
# key tables (``_position_keys``); above it, building those tables costs more than it saves and
# ``_relative_logits`` wins (measured per halonet shape, docs/performance.md).
MAX_DIM_FOR_POSITION_KEYS = 16


def halo_attention(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """Same contract as ``reference.halo_attention``, without probabilities."""
    B, _, H, W = x.shape
    heads, dk, dv = spec.num_heads, spec.dim_head_qk, spec.dim_head_v
    bs, bq, win, s = spec.block_size, spec.query_block_size, spec.win_size, spec.block_stride
    nh, nw = H // bs, W // bs
    d = max(dk, dv)  # the fused kernel wants one head width for q, k and v: pad the narrower

    use_position_keys = dk <= MAX_DIM_FOR_POSITION_KEYS
    if use_position_keys:
        position_keys = _position_keys(weights, spec).transpose(1, 2)  # Q, dk, K
    else:  # the mask gets no scale from SDPA: scale the table instead
        rel_table = torch.cat([weights.height_rel, weights.width_rel])
        if spec.scale_pos_embed:
            rel_table = rel_table * spec.scale

    out = empty_output(x, spec)  # written block by block
    out_blocks = out.view(B, heads, dv, nh, bq, nw, bq).permute(0, 3, 5, 1, 4, 6, 2)  # B, nh, nw, heads, bq, bq, dv
    for images, row_starts in _chunks(B, nh, nw * heads):
        xi = x[images]
        n = xi.shape[0]
        q = project_channels_last(xi[:, :, ::s, ::s] if s > 1 else xi, weights.q_weight, weights.q_bias)
        q = q.view(n, nh, bq, nw, bq, heads, dk).permute(0, 1, 3, 5, 2, 4, 6)  # n, nh, nw, heads, bq, bq, dk
        kv = project_channels_last(xi, weights.kv_weight, weights.kv_bias)
        kv = F.pad(kv, (0, 0) + (spec.halo_size,) * 4)  # zero halo around the map
        # Every block's window as a strided view (no copy): n, nh, nw, heads, win, win, dk + dv.
        kv = kv.unfold(1, win, bs).unfold(2, win, bs)
        kv = kv.view(n, nh, nw, heads, dk + dv, win, win).permute(0, 1, 2, 3, 5, 6, 4)
        for r in row_starts:
            rows = slice(r, r + row_starts.step)
            q_c = q[:, rows]
            units = q_c.shape[:4]
            # The one copy of the windows; SDPA reads k and v from it through strided views.
            kv_c = kv[:, rows].reshape(-1, heads, win * win, dk + dv)
            k_c, v_c = kv_c.split([dk, dv], dim=-1)
            if use_position_keys:
                q_c = q_c.reshape(-1, heads, bq * bq, dk)
                # The query position is the matmul batch: (Q, units, K), handed to SDPA as a
                # strided (units, heads, Q, K) view without a copy.
                mask = torch.matmul(q_c.permute(2, 0, 1, 3).flatten(1, 2), position_keys)
                mask = mask.view(bq * bq, -1, heads, win * win).permute(1, 2, 0, 3)
            else:
                mask = _relative_logits(q_c, rel_table, win).view(-1, heads, bq * bq, win * win)
                q_c = q_c.reshape(-1, heads, bq * bq, dk)
            if dk != dv:
                q_c, k_c, v_c = (F.pad(t, (0, d - t.shape[-1])) for t in (q_c, k_c, v_c))
            attn = F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=mask, scale=spec.scale)
            out_blocks[images, rows] = attn[..., :dv].reshape(*units, bq, bq, dv)
    return out
