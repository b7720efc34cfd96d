"""Fused halo attention kernel for GPUs, in Triton.

One program per (image x head, query block, tile of the block's queries). It loads its queries
from the q projection, reads the key/value window straight from the kv projection with masked
loads (pixels outside the map read as zeros, so halo keys keep their position logit exactly as
in ``reference.py``: no unfold copy, no padded copy), computes the height and width
relative-position logits on chip (``q @ height_rel.T`` gathered by key row, likewise columns),
runs an online softmax over tiles of the window, and writes the output once, in whatever layout
the output tensor has (NCHW or channels_last). Inputs in fp32, fp16 or bf16; accumulation in fp32.

Optionally the same kernel also writes, for each block, the attention probabilities summed over
its queries (a second pass over the window with the final softmax statistics); the wrapper
averages them over heads and queries into one (win x win) map per block, for heatmaps.

Inference only: there is no backward, so ``unavailable_reason`` refuses a call that needs gradients
(``auto`` then runs ``fused``). Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (tests use
that, at small sizes).
"""
import math
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import NO_BACKWARD, HaloSpec, HaloWeights, empty_output

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs ship without Triton
    triton = None

LOG2E = math.log2(math.e)
# Key tile of the online softmax. Queries per program: the whole query block up to this many.
BLOCK_K = 64
MAX_BLOCK_Q = 64


def unavailable_reason(x: Tensor, needs_grad: bool) -> Optional[str]:
    """Why this backend cannot run on ``x`` (with gradients when ``needs_grad``), or None when it can."""
    if triton is None:
        return "Triton is not installed"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it needs a CUDA tensor, got one on {x.device} (or TRITON_INTERPRET=1 to emulate)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"it supports float32, float16 and bfloat16, not {x.dtype}"
    if needs_grad:
        return NO_BACKWARD
    return None


if triton is not None:

    @triton.jit
    def _window_tile_logits(q, q_height, q_width, k_base, kv_sc, kv_sy, kv_sx, k0, top, left, H, W, qy, qx, q_ok,
                            dk, dk_ok, qk_factor, rel_factor, WIN, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
        """Logits (log2 units) of the queries against keys k0..k0+BLOCK_K of the window, with the
        key indices, which keys exist, which lie inside the map, and their pixel offsets."""
        kj = k0 + tl.arange(0, BLOCK_K)
        k_ok = kj < WIN * WIN
        ky = kj // WIN
        kx = kj % WIN
        y = top + ky
        x = left + kx
        inside = k_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        pixel = y * kv_sy + x * kv_sx
        k_t = tl.load(k_base + dk[:, None] * kv_sc + pixel[None, :],
                      mask=dk_ok[:, None] & inside[None, :], other=0.0)  # (BLOCK_DK, BLOCK_K), zeros outside
        logits = tl.dot(q, k_t, input_precision=PRECISION) * qk_factor
        # Relative logits: row offset ky - qy, column offset kx - qx, read from this program's
        # tables (indices clamped where the query or the key is padding).
        valid = q_ok[:, None] & k_ok[None, :]
        h_index = tl.where(valid, ky[None, :] - qy[:, None] + WIN - 1, 0)
        w_index = tl.where(valid, kx[None, :] - qx[:, None] + WIN - 1, 0)
        logits += (tl.gather(q_height, h_index, 1) + tl.gather(q_width, w_index, 1)) * rel_factor
        return logits, kj, k_ok, inside, pixel

    # One body, not split further: the queries, position tables and softmax statistics stay in registers
    # across both passes, and a helper would only take them all as arguments (see _window_tile_logits).
    # The layer's geometry and WRITE_MAPS are run-time arguments, not specialised on their values: only
    # the tile sides and the dtype make distinct programs, so that the 52 layer geometries of the
    # registered models share a few dozen compiled kernels (a GPU compiles each on first use, and
    # tests/unit/test_triton_compile.py compiles all of them for sm_80 and sm_90). DK and DV keep
    # Triton's divisibility-by-16 specialisation: it lets the head's channels load as vectors.
    @triton.jit(do_not_specialize=["H", "W", "blocks_w", "num_blocks", "q_tiles",
                                   "HEADS", "BS", "BQ", "HALO", "WIN", "WRITE_MAPS"])
    def _halo_attention_kernel(
            q_ptr, kv_ptr, height_ptr, width_ptr, out_ptr, maps_ptr,
            q_sb, q_sc, q_sy, q_sx,
            kv_sb, kv_sc, kv_sy, kv_sx,
            o_sb, o_sc, o_sy, o_sx,
            rel_sr, rel_sd,
            H, W, blocks_w, num_blocks, q_tiles,
            qk_factor, rel_factor,
            HEADS, DK, DV, BS, BQ, HALO, WIN, WRITE_MAPS,
            PRECISION: tl.constexpr,
            BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        block = tl.program_id(1)
        q_tile = tl.program_id(2)
        b = pid_bh // HEADS
        h = pid_bh % HEADS
        block_y = block // blocks_w
        block_x = block % blocks_w

        # This program's queries: (BLOCK_Q, BLOCK_DK), zero beyond the block and the head width.
        qi = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = qi < BQ * BQ
        qy = qi // BQ
        qx = qi % BQ
        dk = tl.arange(0, BLOCK_DK)
        dk_ok = dk < DK
        q = tl.load(q_ptr + b * q_sb + (h * DK + dk[None, :]) * q_sc
                    + (block_y * BQ + qy[:, None]) * q_sy + (block_x * BQ + qx[:, None]) * q_sx,
                    mask=q_ok[:, None] & dk_ok[None, :], other=0.0)

        # Each query against every relative offset, rows and columns: (BLOCK_Q, BLOCK_R) each.
        r = tl.arange(0, BLOCK_R)
        rel_mask = (r[None, :] < 2 * WIN - 1) & dk_ok[:, None]
        rel_offsets = r[None, :] * rel_sr + dk[:, None] * rel_sd
        height = tl.load(height_ptr + rel_offsets, mask=rel_mask, other=0.0).to(q.dtype)
        width = tl.load(width_ptr + rel_offsets, mask=rel_mask, other=0.0).to(q.dtype)
        q_height = tl.dot(q, height, input_precision=PRECISION)
        q_width = tl.dot(q, width, input_precision=PRECISION)


        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        top = block_y * BS - HALO
        left = block_x * BS - HALO
        k_base = kv_ptr + b * kv_sb + h * (DK + DV) * kv_sc
        v_base = k_base + DK * kv_sc

        row_max = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_Q,), tl.float32)
        acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
        for k0 in range(0, WIN * WIN, BLOCK_K):
            logits, kj, k_ok, inside, pixel = _window_tile_logits(
                q, q_height, q_width, k_base, kv_sc, kv_sy, kv_sx, k0, top, left, H, W, qy, qx, q_ok, dk, dk_ok,
                qk_factor, rel_factor, WIN, BLOCK_K, PRECISION)
            logits = tl.where(k_ok[None, :], logits, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(logits, 1))
            p = tl.exp2(logits - new_max[:, None])
            correction = tl.exp2(row_max - new_max)
            row_sum = row_sum * correction + tl.sum(p, 1)
            v = tl.load(v_base + dv[None, :] * kv_sc + pixel[:, None],
                        mask=inside[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_DV)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max

        out = acc / row_sum[:, None]
        tl.store(out_ptr + b * o_sb + (h * DV + dv[None, :]) * o_sc
                 + (block_y * BQ + qy[:, None]) * o_sy + (block_x * BQ + qx[:, None]) * o_sx,
                 out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])

        if WRITE_MAPS:
            # Second pass with the final statistics: probabilities summed over this tile's queries.
            maps_base = maps_ptr + ((pid_bh * num_blocks + block) * q_tiles + q_tile) * (WIN * WIN)
            for k0 in range(0, WIN * WIN, BLOCK_K):
                logits, kj, k_ok, inside, pixel = _window_tile_logits(
                    q, q_height, q_width, k_base, kv_sc, kv_sy, kv_sx, k0, top, left, H, W, qy, qx, q_ok, dk, dk_ok,
                    qk_factor, rel_factor, WIN, BLOCK_K, PRECISION)
                p = tl.exp2(logits - row_max[:, None]) / row_sum[:, None]
                p = tl.where(q_ok[:, None] & k_ok[None, :], p, 0.0)
                tl.store(maps_base + kj, tl.sum(p, 0), mask=k_ok)


def _next_power_of_2(n: int, at_least: int = 16) -> int:
    """Triton tiles have power-of-two sides; tl.dot wants at least 16."""
    return max(at_least, 1 << (n - 1).bit_length())


class KernelCall(NamedTuple):
    """One launch of ``_halo_attention_kernel``, all decided but not run: what ``_launch`` runs, and what
    tests/unit/test_triton_compile.py compiles ahead of time for GPUs that are not there."""

    grid: Tuple[int, int, int]
    args: Tuple[object, ...]
    keywords: Dict[str, object]  # the constexprs, and the launch options num_warps and num_stages
    out: Tensor
    maps: Optional[Tensor]  # the per-(image x head, block, query tile) sums, when asked for


def kernel_call(q: Tensor, kv: Tensor, weights: HaloWeights, spec: HaloSpec, with_maps: bool) -> KernelCall:
    """The launch of the kernel on the projections, its output (and maps) allocated."""
    B, _, H, W = kv.shape
    heads, bq, win = spec.num_heads, spec.query_block_size, spec.win_size
    blocks_w = W // spec.block_size
    num_blocks = (H // spec.block_size) * blocks_w
    out = empty_output(kv, spec)  # kv has the input's size and memory format
    block_q = min(MAX_BLOCK_Q, _next_power_of_2(bq * bq))
    q_tiles = triton.cdiv(bq * bq, block_q)
    maps = (torch.empty(B * heads * num_blocks * q_tiles * win * win, device=q.device, dtype=torch.float32)
            if with_maps else None)
    height_rel, width_rel = weights.height_rel, weights.width_rel
    args = (q, kv, height_rel, width_rel, out, out if maps is None else maps,  # an unused pointer without maps
            *q.stride(), *kv.stride(), *out.stride(), *height_rel.stride(),
            H, W, blocks_w, num_blocks, q_tiles,
            # Logits in log2 units (the softmax runs on exp2); position logits scaled only if asked.
            spec.scale * LOG2E, (spec.scale if spec.scale_pos_embed else 1.0) * LOG2E,
            heads, spec.dim_head_qk, spec.dim_head_v, spec.block_size, bq, spec.halo_size, win, int(with_maps))
    keywords = dict(
        # fp32 stays exact fp32 (no TF32) so that it matches the reference to 1e-5.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_Q=block_q, BLOCK_K=BLOCK_K, BLOCK_DK=_next_power_of_2(spec.dim_head_qk),
        BLOCK_DV=_next_power_of_2(spec.dim_head_v), BLOCK_R=_next_power_of_2(2 * win - 1))
    keywords.update(launch_options(block_q, keywords["BLOCK_DV"], q.dtype))
    return KernelCall((B * heads, num_blocks, q_tiles), args, keywords, out, maps)


def launch_options(block_q: int, block_dv: int, dtype: torch.dtype) -> Dict[str, int]:
    """Warps and software-pipelining stages of one program. Triton's defaults (4 warps, 3 stages) spilled
    registers in the sm_80/sm_90 compiles for a 64 x 256 accumulator in fp16 and a 64 x 32 one in fp32,
    and 3 stages of 64 x 256 fp32 tiles needed 196,864 B of shared memory, more than an A100's 166,912 B:
    accumulators from 64 x 128 (from 64 x 32 in fp32) get 8 warps and one stage, the rest the defaults
    (tests/unit/test_triton_compile.py prints what each kernel uses). To be tuned by timing on a GPU."""
    accumulator = block_q * block_dv
    if accumulator >= 64 * 128 or (dtype == torch.float32 and accumulator >= 64 * 32):
        return dict(num_warps=8, num_stages=1)
    return dict(num_warps=4, num_stages=3)


def _launch(q: Tensor, kv: Tensor, weights: HaloWeights, spec: HaloSpec,
            with_maps: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The kernel on the projections: the output and, with ``with_maps``, the per-block maps (else None)."""
    call = kernel_call(q, kv, weights, spec, with_maps)
    _halo_attention_kernel[call.grid](*call.args, **call.keywords)
    if call.maps is None:
        return call.out, None
    B, heads, bq = kv.shape[0], spec.num_heads, spec.query_block_size
    num_blocks, q_tiles = call.grid[1], call.grid[2]
    maps = call.maps.view(B, heads, num_blocks, q_tiles, spec.win_size, spec.win_size).sum(dim=(1, 3))
    return call.out, maps / (heads * bq * bq)


def attend(q: Tensor, kv: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """The kernel alone, given the projections q (B, heads*dk, Hq, Wq) and kv (B, heads*(dk+dv), H, W);
    the output has kv's memory format."""
    return _launch(q, kv, weights, spec, with_maps=False)[0]


def _projections(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tuple[Tensor, Tensor]:
    q = F.conv2d(x, weights.q_weight, weights.q_bias, stride=spec.block_stride)
    return q, F.conv2d(x, weights.kv_weight, weights.kv_bias)


def halo_attention(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """Same contract as ``reference.halo_attention``, without probabilities; the output keeps x's memory
    format. For inputs that ``unavailable_reason`` accepted: ``HaloAttention`` checks."""
    return attend(*_projections(x, weights, spec), weights, spec)


def halo_attention_and_maps(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tuple[Tensor, Tensor]:
    """``halo_attention`` and, from the same pass, one map per block (B, blocks, win, win): the attention
    probabilities of the block averaged over heads and over its queries (it sums to 1 over the window)."""
    out, maps = _launch(*_projections(x, weights, spec), weights, spec, with_maps=True)
    return out, maps
