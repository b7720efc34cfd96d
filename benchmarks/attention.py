"""Halo attention speed: timm's ``HaloAttn`` against ours, same weights, side by side in one run.

The shapes are read off timm's own models (a forward hook on every ``HaloAttn`` of
``halonet_h1`` and ``halonet26t`` at 256 px), so they are exactly the layers users run.
Each row times both layers alternately, several rounds, and reports medians, their ratio
and the largest absolute difference between the two outputs.

    python -m benchmarks.attention            # table
    python -m benchmarks.attention --json out.json
"""
import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Tuple

import torch
from timm.layers.halo_attn import HaloAttn

from model import HaloAttention

MODELS = ("halonet_h1", "halonet26t")


@dataclass(frozen=True)
class LayerShape:
    model: str
    dim: int
    dim_out: int
    stride: int
    num_heads: int
    dim_head: int
    block_size: int
    halo_size: int
    height: int
    width: int

    def label(self) -> str:
        return (f"{self.model} {self.dim}->{self.dim_out} {self.height}x{self.width} s{self.stride} "
                f"bs{self.block_size} h{self.halo_size}")


def timm_layer_shapes(model_name: str, image_size: int = 256) -> List[LayerShape]:
    """Distinct halo attention layers of a timm model, with the feature map each one sees."""
    import timm

    net = timm.create_model(model_name).eval()
    shapes: Dict[LayerShape, None] = {}

    def record(layer: HaloAttn, inputs: Tuple[torch.Tensor], _output: torch.Tensor) -> None:
        stride = 2 if layer.block_stride == 2 or not isinstance(layer.pool, torch.nn.Identity) else 1
        shapes[LayerShape(
            model_name, layer.q.in_channels, layer.dim_out_v, stride, layer.num_heads, layer.dim_head_qk,
            layer.block_size, layer.halo_size, inputs[0].shape[2], inputs[0].shape[3])] = None

    for module in net.modules():
        if isinstance(module, HaloAttn):
            module.register_forward_hook(record)
    with torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    return list(shapes)


def build_pair(shape: LayerShape, backend: str) -> Tuple[torch.nn.Module, torch.nn.Module]:
    kwargs = dict(dim=shape.dim, dim_out=shape.dim_out, stride=shape.stride, num_heads=shape.num_heads,
                  dim_head=shape.dim_head, block_size=shape.block_size, halo_size=shape.halo_size)
    theirs = HaloAttn(**kwargs).eval()
    ours = HaloAttention(**kwargs, backend=backend).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def time_alternating(fns: List[Callable[[], object]], rounds: int, min_seconds: float) -> List[float]:
    """Median seconds per call of each fn, timed in alternation so that machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up: allocations, lazy init
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds:
                    break
            out.append(elapsed / calls)
    return [statistics.median(s) for s in samples]


def run(batches: List[int], backend: str, rounds: int, min_seconds: float) -> Dict[str, object]:
    rows = []
    for model_name in MODELS:
        for shape in timm_layer_shapes(model_name):
            for batch in batches:
                torch.manual_seed(0)
                theirs, ours = build_pair(shape, backend)
                x = torch.randn(batch, shape.dim, shape.height, shape.width)
                with torch.inference_mode():
                    err = (theirs(x) - ours(x)).abs().max().item()
                    t_timm, t_ours = time_alternating([lambda: theirs(x), lambda: ours(x)], rounds, min_seconds)
                rows.append(dict(shape=asdict(shape), label=shape.label(), batch=batch, timm_ms=t_timm * 1e3,
                                 ours_ms=t_ours * 1e3, speedup=t_timm / t_ours, max_abs_err=err))
                print(f"{shape.label():<42} b{batch:<3} timm {t_timm * 1e3:9.2f} ms  ours {t_ours * 1e3:9.2f} ms"
                      f"  x{t_timm / t_ours:5.2f}  err {err:.1e}", flush=True)
    summary = {}
    for model_name in MODELS:
        ratios = [r["speedup"] for r in rows if r["shape"]["model"] == model_name]
        summary[model_name] = dict(geomean_speedup=math.exp(sum(map(math.log, ratios)) / len(ratios)),
                                   min_speedup=min(ratios))
        print(f"{model_name}: geometric-mean speedup x{summary[model_name]['geomean_speedup']:.2f}, "
              f"slowest shape x{summary[model_name]['min_speedup']:.2f}")
    return dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, backend=backend,
                rows=rows, summary=summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backend", default="auto", help="our backend: auto, fused or reference")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per row")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per layer per row")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"halo attention, timm vs ours ({args.backend}), fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    result = run(args.batch, args.backend, args.rounds, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
