"""Turning a trained HaloNet into a fast inference model: BN folding, layout, precision, trace (compiled
ahead of time: ``model.compiled``);
and what a forward gives its halo attention layers (their inputs, seen by hooks)."""
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .attention import HaloAttention
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
) -> nn.Module:
    """Eval mode, no gradients, BN folded, on ``device`` in ``dtype`` and layout.

    Half precision (fp16/bf16) is refused on CPU: these models are exact in fp32 and the service
    runs them there.
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
    return model


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``model`` under ``torch.compile`` (inductor) with its weights frozen into the graph, which lets
    inductor fold them and prepack the convolutions' weights for oneDNN, for inputs without gradients:
    how a user compiles timm's model (``benchmarks/model.py``'s timm_compiled). One graph per input
    shape (``dynamic=False``): a dynamic batch dimension with frozen channels_last weights failed
    inductor's stride checks at run time (torch 2.14). The service compiles ahead of time instead
    (``model.compiled``: one program for every batch size, cached on disk)."""
    return torch.compile(model, dynamic=False, options={"freezing": True})


@torch.inference_mode()
def trace_for_inference(model: nn.Module, example: Union[Tensor, Tuple[Tensor, ...]]) -> torch.jit.ScriptModule:
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
    Its own check of the trace is off: it ran the model twice more, 2-3 s of halonet26t's start-up,
    to compare to a tolerance what the caller compares bit for bit (``app.engine.Engine``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))


@contextmanager
def seeing_inputs(model: nn.Module, names: Iterable[str],
                  see: Callable[[str, nn.Module, Tensor], None]) -> Iterator[None]:
    """While inside, ``see(name, layer, input)`` before every forward of the submodules named, in this
    thread only: a model may be shared by threads (the service's workers), and another thread's
    forward is not ours. Pre-hooks, as PyTorch runs a snapshot of them: registering or removing one
    while another thread runs the model is safe, and that thread's calls of it do nothing."""
    owner = threading.get_ident()

    def hook(name: str, layer: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        if threading.get_ident() == owner:
            see(name, layer, inputs[0])

    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda layer, inputs, name=name: hook(name, layer, inputs)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def halo_layer_inputs(model: nn.Module, x: Tensor,
                      layer_type: Type[nn.Module] = HaloAttention) -> Dict[str, torch.Size]:
    """The input shape of every ``layer_type`` submodule (ours, or timm's ``HaloAttn``) in one forward of
    ``x`` without gradients, by module name, in forward order."""
    shapes: Dict[str, torch.Size] = {}
    names = [name for name, module in model.named_modules() if isinstance(module, layer_type)]
    with seeing_inputs(model, names, lambda name, _layer, layer_input: shapes.setdefault(name, layer_input.shape)):
        model(x)
    return shapes


class _WithMaps(nn.Module):
    """``model``'s output and, for the rows given, the maps of its halo attention layer named ``layer``
    (which runs once per forward): that layer run again, through ``forward_with_maps``, on what it
    was given, for those rows only."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
        seen = []
        with seeing_inputs(self.model, [self.layer], lambda _name, _layer, layer_input: seen.append(layer_input)):
            out = self.model(x)
        return out, self.model.get_submodule(self.layer).forward_with_maps(seen[-1][rows])[1]


def trace_with_maps(model: nn.Module, layer: str, example: Tensor) -> torch.jit.ScriptModule:
    """``trace_for_inference`` of a forward that also returns the attention maps of the halo layer
    named ``layer`` for some rows: ``graph(x, rows)`` is ``(model(x), maps)``, maps (len(rows),
    blocks, win, win) from ``forward_with_maps`` of the layer's input at those rows (int64, any
    number of them). The hook that catches that input runs at trace time only: the tracer records
    its tensor as any other. Why: at batch 1, the shipped model's forward with one image's maps
    took x1.9 the traced forward without when it ran eagerly with a hook on the layer (Python between
    ops); x1.45 with the map pass run eagerly after a traced forward; x1.2-1.3 with that pass traced
    in the same graph (benchmarks/heatmaps.py).
    """
    return trace_for_inference(_WithMaps(model, layer).eval(), (example, torch.zeros(1, dtype=torch.int64)))
