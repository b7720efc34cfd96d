"""The roofline of a halo attention layer: its analytic FLOPs and bytes, the device's ceilings, the bound time.

Nothing can run a layer faster than its FLOPs at the device's FLOP rate or its bytes at the device's
memory bandwidth, whichever takes longer: that bound time over a measured time is how close an
implementation is to the limit. Two scopes: the kernel alone (``triton_kernel.attend`` on the q and kv
projections) and the whole layer (from x). The ceilings are measured on the device (a large copy, a
large matrix product); datasheet figures are kept beside them as leads, not as the limit.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from benchmarks.timing import synchronizer, time_alternating
from model.attention.spec import HaloSpec


class FlopParts(NamedTuple):
    """A multiply-add is 2 FLOPs. Not counted: the softmax (max, exp, sums, division), the scale factors, the
    additions of position logits, biases and the average pool. They are a few elementwise operations per
    logit against 2 x dim_head for its dot product, and they run off the tensor cores, so the matrix-product
    rate that bounds the rest (``measure_flop_rate``) is not theirs."""

    projections: int  # the 1x1 convolutions x -> q (strided when block_stride is 2) and x -> kv
    qk: int  # each query against every key of its win x win window, halo padding included (the kernel computes it)
    pv: int  # the probabilities times the window's values
    position: int  # each query against the 2*win-1 offsets of height_rel and of width_rel: the kernel's tables

    @property
    def kernel(self) -> int:
        return self.qk + self.pv + self.position

    @property
    def layer(self) -> int:
        return self.projections + self.kernel


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int  # the fewest bytes of device memory the work must move: each tensor read or written once

    @property
    def intensity(self) -> float:
        """FLOPs per byte: below the device's flop_rate / bandwidth, memory binds."""
        return self.flops / self.bytes


class LayerCost(NamedTuple):
    kernel: Cost  # q and kv projections and the position tables read, the output before any pool written
    layer: Cost  # x and the weights read, the output after the pool (if any) written
    flops: FlopParts


def halo_layer_cost(spec: HaloSpec, dim: int, height: int, width: int, batch: int, element_size: int) -> LayerCost:
    """Analytic cost of one halo attention layer of geometry ``spec`` on a (batch, dim, height, width) input,
    every tensor ``element_size`` bytes an element. The layers measured have no q/kv bias (timm's HaloNets
    have none), so none is counted."""
    heads, dk, dv, win = spec.num_heads, spec.dim_head_qk, spec.dim_head_v, spec.win_size
    pixels = batch * height * width
    query_pixels = batch * (height // spec.block_stride) * (width // spec.block_stride)
    queries = heads * query_pixels
    q_proj, kv_proj = query_pixels * heads * dk, pixels * heads * (dk + dv)
    flops = FlopParts(projections=2 * dim * (q_proj + kv_proj), qk=2 * queries * win * win * dk,
                      pv=2 * queries * win * win * dv, position=2 * queries * 2 * (2 * win - 1) * dk)
    tables = 2 * (2 * win - 1) * dk
    attended = queries * dv  # the kernel's output, before the 2x2 average pool of avg_pool layers
    output = batch * heads * dv * (height // 2) * (width // 2) if spec.avg_pool else attended
    weights = heads * (2 * dk + dv) * dim + tables  # the q and kv 1x1 kernels, the position tables
    return LayerCost(kernel=Cost(flops.kernel, (q_proj + kv_proj + tables + attended) * element_size),
                     layer=Cost(flops.layer, (batch * dim * height * width + weights + output) * element_size),
                     flops=flops)


@dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes/s
    flop_rate: float  # FLOP/s

    def describe(self) -> str:
        # The ridge: the FLOPs per byte above which compute binds, below which memory does.
        return (f"{self.bandwidth / 1e9:.0f} GB/s, {self.flop_rate / 1e12:.0f} TFLOP/s"
                f" (ridge {self.flop_rate / self.bandwidth:.0f} FLOP/B)")


# Datasheet leads: HBM bandwidth and the dense (no sparsity) fp16/bf16 tensor-core rate. The first key found
# in the device's name wins, so the H100 PCIe and NVL come before the SXM ("NVIDIA H100 80GB HBM3"). The A100
# figure is the 80 GB SXM's; other A100s have less bandwidth, one reason the bound uses measured ceilings.
DATASHEET = {
    "H100 PCIe": Ceilings(2000e9, 756e12),
    "H100 NVL": Ceilings(3900e9, 835e12),
    "H100": Ceilings(3350e9, 989e12),
    "H200": Ceilings(4800e9, 989e12),
    "A100": Ceilings(2039e9, 312e12),
}


def datasheet_ceilings(device_name: str, bandwidth_gbs: Optional[float] = None,
                       tflops: Optional[float] = None) -> Optional[Ceilings]:
    """The datasheet lead for ``device_name``, either figure replaced by its override when given;
    None when a figure is neither in the table nor given."""
    known = next((c for name, c in DATASHEET.items() if name in device_name), None)
    bandwidth = bandwidth_gbs * 1e9 if bandwidth_gbs else (known.bandwidth if known else None)
    flop_rate = tflops * 1e12 if tflops else (known.flop_rate if known else None)
    return Ceilings(bandwidth, flop_rate) if bandwidth and flop_rate else None


# Both ceilings are timed like the benchmark's rows (time_alternating, synchronized after each call), so a
# row and its bound carry the same per-call overhead; the sizes make that overhead about 1% on an H100.
def measure_bandwidth(device: str, elements: int = 1 << 29, rounds: int = 7, min_seconds: float = 1.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read plus bytes written: 2 x 2 GiB of float32 by default,
    far beyond any L2 cache."""
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    seconds, = time_alternating([lambda: dst.copy_(src)], rounds, min_seconds, synchronizer(device))
    return 2 * src.numel() * src.element_size() / seconds


def measure_flop_rate(dtype: torch.dtype, device: str, side: int = 8192, rounds: int = 7,
                      min_seconds: float = 1.0) -> float:
    """FLOP/s of a side x side x side matrix product in ``dtype``, on random data (zeros would flatter the power
    draw, and with it the clocks)."""
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    seconds, = time_alternating([lambda: torch.mm(a, b, out=out)], rounds, min_seconds, synchronizer(device))
    return 2 * side ** 3 / seconds


def bound_seconds(cost: Cost, ceilings: Ceilings) -> Tuple[float, str]:
    """The roofline: the least time ``cost`` can take under ``ceilings``, and which side binds
    ("memory" or "compute")."""
    memory, compute = cost.bytes / ceilings.bandwidth, cost.flops / ceilings.flop_rate
    return (memory, "memory") if memory >= compute else (compute, "compute")
