"""A prepared HaloNet compiled ahead of time for the CPU (``HALO_COMPILE``), cached on disk.

What: ``torch.export`` of the model with a dynamic batch dimension, compiled by AOTInductor
with its weights frozen into the program (inductor folds them, fuses the element-wise ops and runs
the convolutions and linear layers through oneDNN, with their activations fused) into one
``.pt2`` package: a shared library and its weights. One compile
serves every batch size the batcher forms; the ``cpp`` attention kernel runs inside it as the
op it is. A package is loaded in milliseconds, so a start with a warm cache pays nothing.

Why not ``torch.compile``: it compiles one graph per batch size (a dynamic batch with frozen
channels_last weights failed inductor's stride checks, torch 2.14), and every process traces the
model again before its cache can answer (4-5 s per batch size for halonet26t, cached).

The cache (``cache_dir``) holds one file per key: the model's code and weights, the input size,
torch's version and the CPU features that decide the vector instructions inductor generates code
for (``cpu_features``: a package built for AVX-512 must not run where there is none). A package is
written under a temporary name and renamed, so that replicas sharing a cache never read half a file.

Run through ``torch.ops`` (``csrc/compiled_package.cpp``), which releases Python's GIL during
the forward, as the traced graph's run does; the loader's own binding holds it (a Python loop beside
a compiled halonet26t forward ran at 4-8% of its pace alone through the binding, 50% through the op).
"""
import atexit
import copy
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import cpp

log = logging.getLogger("halo.compile")

MODEL_SOURCES = Path(__file__).parent  # the model's code: a change to it is a new key
RUNNER_SOURCE = MODEL_SOURCES / "csrc" / "compiled_package.cpp"
_runner_lock = threading.Lock()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/halonet/compiled``, by default ``~/.cache/halonet/compiled``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "halonet" / "compiled"


def load_runner() -> None:
    """Build (or find under ``TORCH_EXTENSIONS_DIR``) and load the op that runs a package; and the ``cpp``
    attention kernel, whose op a package calls by name (where it cannot be built, no package uses it)."""
    cpp.load()
    with _runner_lock:
        if hasattr(torch.ops.halonet_compiled, "run"):
            return
        from torch.utils import cpp_extension

        cpp_extension.load(name="halonet_compiled_package", sources=[str(RUNNER_SOURCE)], is_python_module=False,
                           extra_cflags=["-O2"], verbose=False)


def cpu_features() -> str:
    """What of this CPU decides the vector instructions inductor compiles for (e.g. ``x86_64 AVX512
    avx2 avx512 avx512_vnni``): the architecture, ATen's capability (``ATEN_CPU_CAPABILITY`` lowers
    it) and the x86 extensions inductor looks for. Read from the CPU, not from inductor's choice
    (``pick_vec_isa``), which compiles and loads a test program per extension: 7-8 s on every
    start where its cache is empty, as in a pod whose /tmp is a fresh volume."""
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *x86_isa_checker()])


def package_key(model: nn.Module, input_shape: Sequence[int], variant: str = "") -> str:
    """What a package depends on, digested: a change to any gives another file. ``variant``: what else
    the traced program depends on (the service passes its attention backends)."""
    digest = hashlib.sha256()
    described = f"{torch.__version__} {cpu_features()} {tuple(input_shape)} {type(model).__name__} {variant}"
    digest.update(described.encode())
    for source in sorted(MODEL_SOURCES.rglob("*")):
        if source.suffix in (".py", ".cpp"):
            digest.update(source.relative_to(MODEL_SOURCES).as_posix().encode())
            digest.update(source.read_bytes())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def compile_package(model: nn.Module, input_shape: Sequence[int], path: Path) -> None:
    """AOTInductor's package of ``model`` (prepared: eval, channels_last, float32 on the CPU) for
    batches of any size of ``input_shape`` images, written to ``path``."""
    example = torch.zeros(2, *input_shape).contiguous(memory_format=torch.channels_last)
    model = with_two_channel_inputs(model)
    batch = torch.export.Dim("batch", min=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on the dynamic dimension
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".partial.pt2")
    os.close(handle)
    try:
        # dynamic_threads: the generated loops use the calling thread's torch threads, set at run
        # time (model workers differ in number and threads), not a count fixed at compile time.
        # no_grad: inductor freezes only without gradients; with them it silently keeps the weights
        # as inputs and the convolutions as ATen's (halonet26t x1.3 slower, docs/performance.md).
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                exported, package_path=partial, inductor_configs={"freezing": True, "cpp.dynamic_threads": True})
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide it from another user sharing the cache
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


class TwoChannelConv(nn.Module):
    """A convolution of one input channel as one of two, the second all zeros (the same sums): oneDNN,
    which the compiled program runs convolutions on, gave wrong answers for a single input channel with
    a dynamic batch (off by up to 1.9 on unit inputs, torch 2.14), for two the right ones."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = nn.Conv2d(2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              bias=conv.bias is not None, padding_mode=conv.padding_mode)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([conv.weight, torch.zeros_like(conv.weight)], dim=1))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        self.conv.to(memory_format=torch.channels_last).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.cat([x, torch.zeros_like(x)], dim=1))


def with_two_channel_inputs(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it whose convolutions of one input channel are ``TwoChannelConv``."""
    single = [name for name, m in model.named_modules()
              if type(m) is nn.Conv2d and m.in_channels == 1]  # a subclass may convolve otherwise
    if not single:
        return model
    model = copy.deepcopy(model)
    for name in single:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, TwoChannelConv(model.get_submodule(name)))
    return model


class CompiledModel:
    """A loaded package: ``model(x)`` is the compiled forward of a (B, C, H, W) float32 batch on the
    CPU (any B), ``runners`` of them at once (one per model worker)."""

    def __init__(self, path: Path, input_shape: Sequence[int], runners: int):
        load_runner()
        self.path = path
        self.input_shape = tuple(input_shape)
        self._package = torch.classes.halonet_compiled.Package(str(path), runners)

    def __call__(self, x: Tensor) -> Tensor:
        # The program checks nothing: an image of another size would be read past its end.
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"this model was compiled for float32 CPU batches of {self.input_shape} images, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
        return torch.ops.halonet_compiled.run(self._package, x.contiguous(memory_format=torch.channels_last))


@dataclass
class CompileResult:
    model: CompiledModel
    cached: bool  # the package was in the cache
    seconds: float  # to compile (or find) and load it


def load_or_compile(model: nn.Module, input_shape: Sequence[int], runners: int,
                    cache_dir: Optional[Path] = None, variant: str = "") -> CompileResult:
    """``model`` compiled, from ``cache_dir`` (``default_cache_dir()`` when None) when a package of the
    same key is there, else compiled into it. Where the cache cannot be written (a read-only image
    built for another machine), the package is compiled into a temporary folder, removed at exit."""
    started = time.perf_counter()
    load_runner()  # before any compile: a broken build fails fast, in seconds
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{getattr(model, 'name', type(model).__name__)}-{package_key(model, input_shape, variant)}.pt2"
    cached = path.is_file()
    if not cached:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(cache_dir, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            log.warning("compile cache %s is not writable: compiling into a temporary folder", cache_dir)
            scratch = tempfile.mkdtemp(prefix="halonet-compiled-")
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
            path = Path(scratch) / path.name
        log.info("compiling %s ahead of time into %s (once per model, machine and torch version)", path.stem, path)
        compile_package(model, input_shape, path)
    return CompileResult(CompiledModel(path, input_shape, runners), cached, time.perf_counter() - started)
