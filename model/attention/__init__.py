"""Halo attention (Vaswani et al., 2021) with the parameters and semantics of timm's ``HaloAttn``.

One module, several backends, one dispatch point (``HaloAttention.backend_for``):

- ``reference``: exact, readable, materializes the attention probabilities (tests, heatmaps).
- ``fused``: the fast path in PyTorch ops (CPU and any device); trainable.
- ``cpp``: the compiled CPU kernel (float32; built on first use); inference only.
- ``triton``: the fused GPU kernel (CUDA, or emulated with ``TRITON_INTERPRET=1``); inference only.
- ``auto``: the first of ``triton`` (CUDA inputs), ``cpp`` (CPU inputs) and ``fused`` that can run
  the call: so for inference ``triton`` on CUDA when Triton is installed, ``cpp`` for float32 on
  the CPU when the kernel builds; ``fused`` for anything that needs gradients.

Each backend is a ``Backend``: its function and its ``unavailable_reason(x, needs_grad)``, which
says why it cannot run a call (device, dtype, gradients: the compiled kernels have no backward, a
failed build). ``compatible_backends`` lists those that can. A backend that cannot run is never
replaced silently by another: forcing it raises ``BackendUnavailable``, and when ``auto`` cannot
build the C++ kernel it logs why, once.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import cpp, fused, reference
from . import triton as triton_kernel
from .spec import HaloSpec, HaloWeights

__all__ = ["HaloAttention", "BACKENDS", "Backend", "BackendUnavailable", "HaloSpec", "HaloWeights",
           "compatible_backends", "make_divisible"]


def _runs_anything(x: Tensor, needs_grad: bool) -> Optional[str]:
    return None  # PyTorch ops on any device and dtype, differentiable


class Backend(NamedTuple):
    """One implementation: ``run(x, weights, spec) -> output``, and why it cannot run ``x`` (None: it can)."""

    run: Callable[[Tensor, HaloWeights, HaloSpec], Tensor]
    unavailable_reason: Callable[[Tensor, bool], Optional[str]]


BACKENDS: Dict[str, Backend] = {
    "reference": Backend(lambda x, weights, spec: reference.halo_attention(x, weights, spec)[0], _runs_anything),
    "fused": Backend(fused.halo_attention, _runs_anything),
    "cpp": Backend(cpp.halo_attention, cpp.unavailable_reason),
    "triton": Backend(triton_kernel.halo_attention, triton_kernel.unavailable_reason),
}
_CHOICES = tuple(BACKENDS) + ("auto",)


class BackendUnavailable(ValueError):
    """A backend was asked for that cannot run this call; the message says why."""


def compatible_backends(x: Tensor, needs_grad: bool = False) -> List[str]:
    """The backends that can run halo attention on ``x`` (its device and dtype; with gradients when
    ``needs_grad``), in ``BACKENDS`` order. Asking about ``cpp`` builds its kernel on first use."""
    return [name for name, backend in BACKENDS.items() if backend.unavailable_reason(x, needs_grad) is None]


def _auto(x: Tensor, needs_grad: bool) -> str:
    # The compiled kernels beat fused on every shape measured in the earlier sessions; on the AVX2 EPYC
    # of 2026-12-02 cpp lost on most (docs/performance.md, "Against ONNX Runtime"), so this order is to be
    # decided by measurement where the service runs (issue 18). Triton is a candidate for CUDA inputs
    # only: on the CPU it would be its interpreter, an emulation for tests.
    candidates = ("triton", "cpp") if x.is_cuda else ("cpp",)
    return next((name for name in candidates if BACKENDS[name].unavailable_reason(x, needs_grad) is None), "fused")


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor``, not below ``round_limit`` of ``value`` (timm's rounding)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class PosEmbedRel(nn.Module):
    """Relative position tables, one row per offset in (-(win-1), win-1); timm's key names."""

    def __init__(self, win_size: int, dim_head: int):
        super().__init__()
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head))


class HaloAttention(nn.Module):
    """Halo self-attention over non-overlapping blocks, each attending to its block plus a halo.

    Arguments, parameter names and shapes are those of ``timm.layers.HaloAttn``, so a timm
    state dict loads strictly. ``backend`` picks the implementation (see the module doc);
    ``feat_size`` is accepted for signature compatibility and unused, as in timm.
    """

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 8,
            dim_head: Optional[int] = None,
            block_size: int = 8,
            halo_size: int = 3,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            avg_down: bool = False,
            scale_pos_embed: bool = False,
            backend: str = "auto",
    ):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if halo_size < 0 or block_size < 1:
            raise ValueError(f"need block_size >= 1 and halo_size >= 0, got {block_size} and {halo_size}")
        self.backend = self._check_backend_name(backend)
        avg_pool = stride > 1 and (avg_down or block_size % stride != 0)
        dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, 8) // num_heads
        self.spec = HaloSpec(
            num_heads=num_heads,
            dim_head_qk=dim_head_qk,
            dim_head_v=dim_out // num_heads,
            block_size=block_size,
            halo_size=halo_size,
            block_stride=stride if stride > 1 and not avg_pool else 1,
            avg_pool=avg_pool,
            scale_pos_embed=scale_pos_embed,
        )
        s = self.spec
        self.dim = dim
        self.q = nn.Conv2d(dim, num_heads * s.dim_head_qk, 1, stride=s.block_stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, num_heads * (s.dim_head_qk + s.dim_head_v), 1, bias=qkv_bias)
        self.pos_embed = PosEmbedRel(s.win_size, s.dim_head_qk)
        self.pool = nn.AvgPool2d(2, 2) if avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal, fan-in std for projections, ``scale`` for positions."""
        std = self.q.weight.shape[1] ** -0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.spec.scale)
        nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.spec.scale)

    @staticmethod
    def _check_backend_name(name: str) -> str:
        if name not in _CHOICES:
            raise ValueError(f"unknown halo attention backend {name!r}; choose one of {', '.join(_CHOICES)}")
        return name

    def set_backend(self, name: str) -> None:
        """Switch the implementation (``reference``, ``fused``, ``cpp``, ``triton`` or ``auto``)."""
        self.backend = self._check_backend_name(name)

    def weights(self) -> HaloWeights:
        return HaloWeights(
            self.q.weight, self.q.bias, self.kv.weight, self.kv.bias,
            self.pos_embed.height_rel, self.pos_embed.width_rel)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"expected input of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        bs = self.spec.block_size
        if H % bs or W % bs:
            raise ValueError(
                f"feature map {H}x{W} is not a multiple of the block size {bs}: "
                f"resize the input so that both sides divide by {bs}")

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def backend_for(self, x: Tensor) -> str:
        """The one dispatch point: the backend that runs ``x`` (``auto`` resolved); ``BackendUnavailable``
        when the backend asked for cannot run it."""
        needs_grad = self._needs_grad(x)
        if self.backend == "auto":
            return _auto(x, needs_grad)
        reason = BACKENDS[self.backend].unavailable_reason(x, needs_grad)
        if reason is not None:
            raise BackendUnavailable(f"halo attention backend {self.backend!r} is not available: {reason}")
        return self.backend

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        out = BACKENDS[self.backend_for(x)].run(x, self.weights(), self.spec)
        return self.pool(out)

    def forward_with_maps(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Output and one attention map per block, (B, blocks, win, win), blocks in row-major order.

        A block's map is its attention probabilities averaged over heads and over the block's
        queries (it sums to 1 over the window). The Triton kernel writes them in the same pass;
        elsewhere they come from the reference path, which materializes all probabilities.
        """
        self._check_input(x)
        if self.backend_for(x) == "triton":
            out, maps = triton_kernel.halo_attention_and_maps(x, self.weights(), self.spec)
        else:
            out, probs = reference.halo_attention(x, self.weights(), self.spec, return_probs=True)
            win = self.spec.win_size
            maps = probs.mean(dim=(1, 3)).unflatten(-1, (win, win))
        return self.pool(out), maps

    def extra_repr(self) -> str:
        s = self.spec
        return (f"heads={s.num_heads}, dim_head_qk={s.dim_head_qk}, dim_head_v={s.dim_head_v}, "
                f"block_size={s.block_size}, halo_size={s.halo_size}, block_stride={s.block_stride}, "
                f"avg_pool={s.avg_pool}, backend={self.backend!r}")
