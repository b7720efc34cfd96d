"""HaloNet models in PyTorch: layers, architectures, checkpoints and preprocessing (no HTTP here)."""
from .attention import HaloAttention

__all__ = ["HaloAttention"]
