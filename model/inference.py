"""Turning a trained HaloNet into a fast inference model: BN folding, layout, precision, compile."""
from typing import Optional, Union

import torch
from torch import nn

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
