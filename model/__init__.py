"""HaloNet models in PyTorch: layers, architectures, checkpoints and preprocessing (no HTTP here)."""
from .attention import HaloAttention
from .checkpoint import CheckpointError, load_checkpoint
from .halonet import HaloNet, create_model, list_models, load_labels

__all__ = ["HaloAttention", "HaloNet", "CheckpointError", "create_model", "list_models", "load_checkpoint",
           "load_labels"]
