"""Whole-model speed: timm's HaloNets against ours with identical weights, side by side in one run.

Ours is built from our registry, loaded with the timm model's state dict (strictly), and
prepared as the service runs it (``prepare_for_inference``: eval, BatchNorm folded,
channels_last), in a process whose C heap keeps freed memory as the service's does for these models
(``HALO_KEEP_FREED_MEMORY=auto``: each dominates its request path; ``--heap``): the contenders share
the process, so timm's run on that heap too, and ONNX Runtime keeps its own arena. The contenders
(``--contenders``), timed alternately over several rounds:

- ``timm``: timm's model as users get it (NCHW); ``timm_channels_last``: the same in channels_last;
  ``timm_compiled``: under inductor with frozen weights (``torch.compile``);
- ``onnxruntime``: timm's model exported as a user would (the dynamo exporter, dynamic batch) and
  run by ONNX Runtime's CPU provider on the same threads, spinning off;
- ``ours``: eager; ``ours_traced``: the one TorchScript graph the service runs (``HALO_GRAPH``);
  ``ours_compiled``: what ``HALO_COMPILE`` runs (``model.compiled``: AOTInductor's program, frozen
  weights, the ``cpp`` kernel inside, one compile for every batch size), CPU only.

Each row reports images/s, ours over ONNX Runtime and timm, the compile seconds of what compiles
(timm_compiled: one graph per batch size; ours_compiled: once per model, into an empty cache,
then its load from that cache: a service's start, cold and warm) and the largest absolute logit
difference from timm eager (random weights scaled to keep activations of order one).

    python -m benchmarks.model                          # CPU, batch 1 and 8, fp32
    python -m benchmarks.model --device cuda            # GPU, batch 64, fp16 and bf16
    python -m benchmarks.model --models halonet_h1 --json out.json
"""
import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from app.heap import keep_freed_memory
from benchmarks.timing import add_common_arguments, check_device, geomean, synchronizer, time_alternating
from model import create_model
from model.compiled import CompiledModel, load_or_compile
from model.inference import compile_for_inference, prepare_for_inference, trace_for_inference

TIMM_MODELS = ("halonet_h1", "halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts")


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random weights and BatchNorm statistics that keep activations of order one through the net
    (the default init zeroes each residual branch's last BatchNorm, which would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.dim() > 1:
            p.copy_(noise * p[0].numel() ** -0.5)
        else:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=generator))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=generator))


CONTENDERS = ("timm", "timm_channels_last", "timm_compiled", "onnxruntime", "ours", "ours_traced", "ours_compiled")
DEFAULT_CONTENDERS = ("timm", "timm_channels_last", "onnxruntime", "ours", "ours_traced", "ours_compiled")


def build_models(name: str, device: str, dtype: torch.dtype) -> tuple:
    """timm's model (NCHW) and ours prepared for serving (BN folded, channels_last): same weights."""
    import timm

    theirs = timm.create_model(name).eval()
    randomize_(theirs)
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = prepare_for_inference(ours, device, dtype, channels_last=True)
    return theirs.to(device, dtype).requires_grad_(False), ours


def compiled(model: nn.Module, x: Tensor) -> Tuple[Callable[[], Tensor], float]:
    """``compile_for_inference(model)`` (one graph per batch size) called on ``x``, and the seconds its
    first call took (the compile)."""
    fn = compile_for_inference(model)
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return lambda: fn(x), time.perf_counter() - start


def onnxruntime_session(model: nn.Module, example: Tensor, threads: int, directory: Path):
    """timm's model exported as a user would (the dynamo exporter, a dynamic batch), run by ONNX Runtime's
    CPU provider on ``threads`` intra-op threads, without spinning (an idle spinning pool would steal
    the next contender's cores)."""
    import onnxruntime

    path = directory / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compiled_once(ours: nn.Module, directory: Path) -> Tuple[CompiledModel, Dict[str, float]]:
    """``ours`` compiled as ``HALO_COMPILE`` does, into the empty cache ``directory``, then loaded again
    from it; the seconds of each (a service's start with a cold and with a warm cache)."""
    size = ours.pretrained_cfg.input_size
    cold = load_or_compile(ours, size, 1, directory)
    warm = load_or_compile(ours, size, 1, directory)
    assert warm.cached, "the second load did not find the first's package"
    return warm.model, {"ours_compiled": cold.seconds, "ours_compiled_warm": warm.seconds}


def contenders_for(which: List[str], theirs: nn.Module, ours: nn.Module, x: Tensor, session,
                   ours_compiled: Optional[CompiledModel],
                   compile_seconds: Dict[str, float]) -> Dict[str, Callable[[], object]]:
    """The callables to time on ``x``, by contender name; what compiles records its compile time."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # Dynamo keeps at most 8 graphs per forward function (every model of a family shares one) and
    # past that runs it eagerly without a word: each row compiles afresh.
    torch._dynamo.reset()
    fns: Dict[str, Callable[[], object]] = {}
    for name in which:
        if name == "timm":
            fns[name] = lambda: theirs(x)
        elif name == "timm_channels_last":
            theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
            fns[name] = lambda: theirs_cl(x_cl)
        elif name == "timm_compiled":
            fns[name], compile_seconds[name] = compiled(theirs, x)
        elif name == "onnxruntime":
            feed = {"x": x.numpy()}
            fns[name] = lambda: torch.from_numpy(session.run(None, feed)[0])
        elif name == "ours":
            fns[name] = lambda: ours(x_cl)
        elif name == "ours_traced":
            graph = trace_for_inference(ours, x_cl)
            fns[name] = lambda: graph(x_cl)
        elif name == "ours_compiled" and ours_compiled is not None:
            fns[name] = lambda: ours_compiled(x_cl)
    return fns


def run(names: List[str], batches: List[int], device: str, dtypes: List[torch.dtype], rounds: int,
        seconds: float, which: List[str]) -> Dict[str, object]:
    sync = synchronizer(device)
    if device == "cuda":  # ONNX Runtime's CUDA provider is not installed here; the compiled package is for CPUs
        which = [name for name in which if name not in ("onnxruntime", "ours_compiled")]
    rows = []
    for name in names:
        for dtype in dtypes:
            theirs, ours = build_models(name, device, dtype)
            size = ours.pretrained_cfg.input_size
            with tempfile.TemporaryDirectory() as directory:
                session = (onnxruntime_session(theirs, torch.randn(2, *size), torch.get_num_threads(), Path(directory))
                           if "onnxruntime" in which else None)
                ours_compiled, start_seconds = (compiled_once(ours, Path(directory) / "compiled")
                                                if "ours_compiled" in which else (None, {}))
                for batch in batches:
                    rows.append(_row(name, dtype, batch, theirs, ours, session, ours_compiled, start_seconds, which,
                                     rounds, seconds, sync, device))
    speedups = [r["speedup"] for r in rows if r["speedup"] is not None]
    if speedups:
        print(f"geometric mean, ours over timm: x{geomean(speedups):.2f}")
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)


def _row(name: str, dtype: torch.dtype, batch: int, theirs: nn.Module, ours: nn.Module, session,
         ours_compiled: Optional[CompiledModel], start_seconds: Dict[str, float], which: List[str], rounds: int,
         seconds: float, sync: Callable[[], None], device: str) -> Dict[str, object]:
    x = torch.randn(batch, *ours.pretrained_cfg.input_size, device=device, dtype=dtype)
    compile_seconds: Dict[str, float] = dict(start_seconds)
    with torch.inference_mode():
        expected = theirs(x).float()
    fns = contenders_for(which, theirs, ours, x, session, ours_compiled, compile_seconds)
    with torch.inference_mode():
        errors = {contender: (fn().float() - expected).abs().max().item() for contender, fn in fns.items()}
        times = time_alternating(list(fns.values()), rounds, seconds, sync)
    images_per_s = {contender: batch / t for contender, t in zip(fns, times)}
    row = dict(model=name, dtype=str(dtype).split(".")[-1], batch=batch, images_per_s=images_per_s,
               max_abs_logit_diff=errors, compile_seconds=compile_seconds,
               speedup=images_per_s["ours"] / images_per_s["timm"] if {"ours", "timm"} <= set(fns) else None)
    figures = "  ".join(f"{contender} {ips:6.1f}" for contender, ips in images_per_s.items())
    ratios = "  ".join(f"{ours_name}/{other} x{images_per_s[ours_name] / images_per_s[other]:.2f}"
                       for ours_name in ("ours_traced", "ours_compiled") for other in ("onnxruntime", "timm")
                       if {ours_name, other} <= set(images_per_s))
    worst = max(errors.values())
    print(f"{name:<18} {row['dtype']:<8} b{batch:<3} img/s: {figures}  |  {ratios}  |  max logit err {worst:.1e}"
          + (f"  |  compile s: {', '.join(f'{k} {v:.1f}' for k, v in compile_seconds.items())}"
             if compile_seconds else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TIMM_MODELS), choices=TIMM_MODELS)
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=CONTENDERS,
                        help="what runs beside each other (timm_compiled: about a minute of compile per row)")
    parser.add_argument("--heap", choices=["kept", "default"], default="kept",
                        help="kept: on the CPU, the process's C heap keeps freed memory as the service's does "
                             "for these models (HALO_KEEP_FREED_MEMORY, every contender alike); default: glibc's")
    add_common_arguments(parser, rounds=5, seconds=3.0)
    args = parser.parse_args()
    check_device(parser, args)
    if args.heap == "kept" and args.device == "cpu":  # the service keeps it on the CPU only
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        result = run(args.models, args.batch or [64], "cuda", [torch.float16, torch.bfloat16], args.rounds,
                     args.seconds, args.contenders)
    else:
        print(f"HaloNets, timm vs ours, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
        result = run(args.models, args.batch or [1, 8], "cpu", [torch.float32], args.rounds, args.seconds,
                     args.contenders)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
