"""Halo attention through the compiled CPU kernel (``csrc/halo_attention.cpp``); inference only.

The two 1x1 projections run as PyTorch GEMMs into channels-last layout; the kernel does the
rest per (image, block, head) in cache: no padded or unfolded window copy, no materialized
position logits or attention matrix, and the zero-padded halo keys cost only their position
logit (see the C++ file).

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja are needed; about 15 s once, then cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Where it cannot be built, ``unavailable_reason`` says why (``load``
logs it once), and ``HaloAttention`` runs ``fused`` for ``auto`` or raises when ``cpp`` was forced.
``python -m model.attention.build`` builds it ahead (``make install`` and the Docker image do).
"""
import logging
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .spec import NO_BACKWARD, HaloSpec, HaloWeights, empty_output, project_channels_last

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "halo_attention.cpp"
_lock = threading.Lock()
_build_error: Optional[str] = None
_loaded = False


def load() -> Optional[str]:
    """Build (or find in the cache) and load the kernel; returns why it failed, or None."""
    global _build_error, _loaded
    if _loaded or _build_error is not None:  # read without the lock: torch.compile traces this, and no lock
        return _build_error
    with _lock:
        if _loaded or _build_error is not None:
            return _build_error
        try:
            # Importing cpp_extension warns about CUDA on machines with a CUDA toolkit but no GPU;
            # this build is CPU-only, so that warning is noise here.
            cpp_logger = logging.getLogger("torch.utils.cpp_extension")
            level = cpp_logger.level
            cpp_logger.setLevel(logging.ERROR)
            try:
                from torch.utils import cpp_extension
            finally:
                cpp_logger.setLevel(level)
            cpp_extension.load(
                name="halonet_cpu_kernel", sources=[str(SOURCE)], is_python_module=False,
                # -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers; the library
                # then shares the libgomp that torch has already loaded.
                extra_cflags=["-O3", "-fopenmp", "-Wno-psabi"], extra_ldflags=["-fopenmp"], verbose=False)
            _loaded = True
        except Exception as error:  # a missing compiler or ninja, a read-only cache...
            _build_error = f"could not build {SOURCE.name}: {type(error).__name__}: {error}".strip()
            logger.warning("halo attention C++ kernel unavailable (%s); using the fused PyTorch path", _build_error)
        return _build_error


def unavailable_reason(x: Tensor, needs_grad: bool) -> Optional[str]:
    """Why this backend cannot run on ``x`` (with gradients when ``needs_grad``), or None when it can;
    the kernel is built on the first call that could run it."""
    if x.device.type != "cpu":
        return f"it runs on the CPU, got a tensor on {x.device}"
    if x.dtype != torch.float32:
        return f"it supports float32 only, not {x.dtype}"
    if needs_grad:
        return NO_BACKWARD
    return load()


def halo_attention(x: Tensor, weights: HaloWeights, spec: HaloSpec) -> Tensor:
    """Same contract as ``reference.halo_attention``, without probabilities and without gradients.

    For inputs that ``unavailable_reason`` accepted (which loads the kernel): ``HaloAttention`` checks.
    """
    s = spec.block_stride
    q = project_channels_last(x[:, :, ::s, ::s] if s > 1 else x, weights.q_weight, weights.q_bias)
    kv = project_channels_last(x, weights.kv_weight, weights.kv_bias)
    out = empty_output(x, spec)  # the kernel writes any strides
    # timm scales q.k, and the position logits too when scale_pos_embed is set.
    position_scale = spec.scale if spec.scale_pos_embed else 1.0
    torch.ops.halonet.halo_attention_cpu(
        q, kv, weights.height_rel.detach().contiguous(), weights.width_rel.detach().contiguous(), out,
        spec.num_heads, spec.block_size, spec.halo_size, s, spec.scale, position_scale)
    return out
