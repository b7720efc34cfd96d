"""Turning a trained HaloNet into a fast inference model: BN folding, layout, precision, compile, trace."""
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .halonet import ConvNormAct


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every conv + BatchNorm pair (``ConvNormAct``) into the conv, keeping the activation.

    The BatchNorm after each attention layer stays: no conv precedes it. The folded model's
    state dict is no longer timm's (convs gain biases, those BatchNorms are gone).
    """
    for module in model.modules():
        if isinstance(module, ConvNormAct) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
            module.bn = bn.act
    return model


def prepare_for_inference(
        model: nn.Module,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        fold_bn: bool = True,
        compile: bool = False,
) -> nn.Module:
    """Eval mode, no gradients, BN folded, on ``device`` in ``dtype`` and layout; optionally compiled.

    Half precision (fp16/bf16) is refused on CPU: these models are exact in fp32 and the service
    runs them there. ``compile`` wraps the model in ``torch.compile``; it is off by default because
    no gain has been measured here yet (on CPU it needs a C++ compiler, and each new input shape
    compiles on its first call).
    """
    device = torch.device(device)
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu":
        raise ValueError(f"{dtype} inference is for GPUs; use float32 on CPU")
    model.eval().requires_grad_(False)
    if fold_bn:
        fold_batchnorm(model)
    model.to(device=device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


@torch.inference_mode()
def trace_for_inference(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """The prepared model as one frozen TorchScript graph, which runs the whole forward in C++.

    Why: an eager forward returns to Python between its few hundred ops and takes the GIL each
    time; beside a busy event loop a batch-12 forward of the shipped model took 70 ms instead of
    29 ms alone (Python's 5 ms switch interval, per op), traced 31 ms (docs/performance.md). The
    outputs are the eager model's, bit for bit, at every batch size (tests/unit/test_engine.py).

    For inputs of ``example``'s channels and size (any batch): the input checks of the attention
    layers ran at trace time only. Only ops that torch records can be traced: the ``cpp``,
    ``fused`` and ``reference`` attention backends, not ``triton`` (a kernel launched from Python).
    ``torch.jit`` is deprecated upstream and still the one way here to a Python-free CPU forward
    without a compiler at start-up; its warnings about that and about the checks are silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.freeze(torch.jit.trace(model, example))
