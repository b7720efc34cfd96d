"""Safe checkpoint loading: safetensors, or PyTorch files through the weights-only unpickler.

Accepts what timm and training scripts write: a plain state dict, or one wrapped under
``state_dict`` or ``model``, with or without the ``module.`` prefix of DataParallel/DDP.
Nothing here can unpickle arbitrary objects: ``torch.load(weights_only=True)`` refuses any
global that is not a tensor type, so a malicious pickle fails before anything runs.
"""
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .attention import HaloAttention

PYTORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


def read_state_dict(path: Union[str, Path]) -> Dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped and with ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    elif path.suffix in PYTORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot read {path} as a PyTorch weights file (only tensors and plain containers are "
                f"allowed, nothing was executed): {str(e).splitlines()[0]}") from e
    else:
        raise CheckpointError(
            f"unsupported checkpoint type {path.suffix!r} for {path}: use .safetensors or one of "
            f"{', '.join(PYTORCH_SUFFIXES)}")
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _listing(names: List[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _older_halo_layout(model: nn.Module, state: Dict[str, Tensor], expected: Dict[str, Tensor]) -> Optional[str]:
    """Why the file's halo attention layers cannot load, when their heads have another query/key width.

    timm's ``HaloAttn`` gave each head 16 query/key channels by default until August 2021 (timm
    0.4.9 to 0.4.12), and ``halonet26t`` kept 16 until October 2021: its first weights,
    ``halonet26t_256-9b4bf0b3.pth``, have them. Current timm gives a head the layer's channels over
    its heads. The keys are the same, so only the shapes of ``q``, ``kv`` and ``pos_embed`` tell the
    layouts apart, and such weights are another network, which no reshaping turns into this one."""
    widths = []
    for name, module in model.named_modules():
        key = f"{name}.pos_embed.height_rel"
        if isinstance(module, HaloAttention) and key in state and state[key].shape[-1] != expected[key].shape[-1]:
            widths.append(f"{name} {state[key].shape[-1]} vs {expected[key].shape[-1]}")
    if not widths:
        return None
    return ("its halo attention layers have query/key heads of another width (file vs model, per layer: "
            + _listing(widths) + "). Older timm gave every head 16 query/key channels (timm 0.4.9 to 0.4.12, and "
            "halonet26t until October 2021, as in its first weights, halonet26t_256-9b4bf0b3.pth); current timm's "
            "widths are this model's. Weights of another head width are another network and cannot be converted: "
            "use timm's current weights (halonet26t.a1h_in1k for halonet26t), or build the model with the file's "
            "head width (HaloNetConfig.dim_head)")


def load_checkpoint(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a checkpoint into ``model`` strictly: every key present, no extra key, every shape equal."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        older_layout = _older_halo_layout(model, state, expected)
        problems = [older_layout] if older_layout else []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append("shape mismatches: " + _listing(
                [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]))
        name = getattr(model, "name", type(model).__name__)
        raise CheckpointError(f"checkpoint {path} does not fit model {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
