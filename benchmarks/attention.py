"""Halo attention speed: timm's ``HaloAttn`` against ours, same weights, side by side in one run.

The shapes are read off timm's own models (the input of every ``HaloAttn`` of ``halonet_h1`` and
``halonet26t`` at 256 px, ``model.inference.halo_layer_inputs``), so they are exactly the layers users
run; on GPU the paper's HaloNet-H4 layers at 384 px (from our registry) are added. Every row times its implementations
alternately, several rounds, and reports medians, ratios and the largest absolute difference
from timm's output.

    python -m benchmarks.attention                 # CPU: timm vs ours (auto) and fused, fp32, batch 1 and 8
    python -m benchmarks.attention --device cuda   # GPU: timm, fused, triton, SDPA; fp16 and bf16, batch 64
    python -m benchmarks.attention --json out.json
"""
import argparse
import copy
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
from timm.layers.halo_attn import HaloAttn

from benchmarks.timing import add_common_arguments, check_device, geomean, time_alternating
from model import HaloAttention, create_model
from model.attention import reference
from model.inference import halo_layer_inputs

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
    for name, shape in halo_layer_inputs(net, torch.zeros(1, 3, image_size, image_size), HaloAttn).items():
        layer = net.get_submodule(name)
        stride = 2 if layer.block_stride == 2 or not isinstance(layer.pool, torch.nn.Identity) else 1
        shapes[LayerShape(
            model_name, layer.q.in_channels, layer.dim_out_v, stride, layer.num_heads, layer.dim_head_qk,
            layer.block_size, layer.halo_size, shape[2], shape[3])] = None
    return list(shapes)


def registry_layer_shapes(model_name: str) -> List[LayerShape]:
    """Distinct halo attention layers of one of our registry's models at its own input size."""
    net = create_model(model_name).eval()
    shapes: Dict[LayerShape, None] = {}
    for name, shape in halo_layer_inputs(net, torch.zeros(1, *net.pretrained_cfg.input_size)).items():
        layer = net.get_submodule(name)
        s = layer.spec
        stride = 2 if s.block_stride == 2 or s.avg_pool else 1
        shapes[LayerShape(model_name, layer.dim, s.num_heads * s.dim_head_v, stride, s.num_heads, s.dim_head_qk,
                          s.block_size, s.halo_size, shape[2], shape[3])] = None
    return list(shapes)


# Peak memory bandwidth (GB/s) of the GPUs this benchmark is run on, by name.
PEAK_BANDWIDTH_GBS = {"H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def build_pair(shape: LayerShape, backend: str) -> Tuple[torch.nn.Module, HaloAttention]:
    kwargs = dict(dim=shape.dim, dim_out=shape.dim_out, stride=shape.stride, num_heads=shape.num_heads,
                  dim_head=shape.dim_head, block_size=shape.block_size, halo_size=shape.halo_size)
    theirs = HaloAttn(**kwargs).eval()
    ours = HaloAttention(**kwargs, backend=backend).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def run_cpu(batches: List[int], backend: str, rounds: int, min_seconds: float,
            models: Tuple[str, ...] = MODELS) -> Dict[str, object]:
    """timm, ours (``backend``) and, for comparison, ours with the ``fused`` PyTorch path, alternately."""
    rows = []
    resolved = set()
    for model_name in models:
        for shape in timm_layer_shapes(model_name):
            for batch in batches:
                torch.manual_seed(0)
                theirs, ours = build_pair(shape, backend)
                fused = copy.deepcopy(ours)
                fused.set_backend("fused")
                x = torch.randn(batch, shape.dim, shape.height, shape.width)
                with torch.inference_mode():
                    resolved.add(ours.backend_for(x))
                    err = (theirs(x) - ours(x)).abs().max().item()
                    t_timm, t_ours, t_fused = time_alternating(
                        [lambda: theirs(x), lambda: ours(x), lambda: fused(x)], rounds, min_seconds)
                rows.append(dict(shape=asdict(shape), label=shape.label(), batch=batch, timm_ms=t_timm * 1e3,
                                 ours_ms=t_ours * 1e3, speedup=t_timm / t_ours, fused_ms=t_fused * 1e3,
                                 fused_speedup=t_timm / t_fused, max_abs_err=err))
                print(f"{shape.label():<42} b{batch:<3} timm {t_timm * 1e3:9.2f} ms  ours {t_ours * 1e3:9.2f} ms"
                      f"  x{t_timm / t_ours:5.2f}  err {err:.1e}"
                      f"  (fused {t_fused * 1e3:9.2f} ms x{t_timm / t_fused:5.2f})", flush=True)
    summary = {}
    for model_name in models:
        of_model = [r for r in rows if r["shape"]["model"] == model_name]
        ratios = [r["speedup"] for r in of_model]
        summary[model_name] = dict(geomean_speedup=geomean(ratios), min_speedup=min(ratios),
                                   fused_geomean_speedup=geomean([r["fused_speedup"] for r in of_model]))
        print(f"{model_name}: geometric-mean speedup x{summary[model_name]['geomean_speedup']:.2f}, "
              f"slowest shape x{summary[model_name]['min_speedup']:.2f} "
              f"(fused alone x{summary[model_name]['fused_geomean_speedup']:.2f})")
    print(f"ours ran: {', '.join(sorted(resolved))}")
    return dict(device="cpu", threads=torch.get_num_threads(), torch=torch.__version__, backend=backend,
                resolved_backends=sorted(resolved), rows=rows, summary=summary)


def _unfolded_sdpa_inputs(layer: HaloAttention, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The best stock-op baseline's inputs, built untimed: the reference path's per-block queries and
    materialized windows, and its relative-position logits as an additive mask, images x heads flattened."""
    spec, w = layer.spec, layer.weights()
    q, k, v = reference.queries_and_windows(x, w, spec)
    mask = reference.position_logits(q, w, spec)
    if spec.scale_pos_embed:
        mask = mask * spec.scale
    return tuple(t.flatten(0, 1).contiguous() for t in (q, k, v, mask))


def run_gpu(shapes: List[LayerShape], batch: int, dtypes: List[torch.dtype], rounds: int, min_seconds: float,
            peak_gbs: Optional[float], device: str = "cuda") -> Dict[str, object]:
    """The GPU table. ``device`` is a parameter only so that tests can smoke-run it on CPU."""
    from model.attention import triton as triton_kernel

    name = torch.cuda.get_device_name() if device == "cuda" else device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = peak_gbs or next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in name), None)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            torch.manual_seed(0)
            theirs, ours = build_pair(shape, "auto")
            theirs, ours = theirs.to(device, dtype), ours.to(device, dtype)
            x = torch.randn(batch, shape.dim, shape.height, shape.width, device=device, dtype=dtype)
            spec, w = ours.spec, ours.weights()
            with torch.inference_mode():
                expected = theirs(x)
                q_proj = torch.nn.functional.conv2d(x, w.q_weight, stride=spec.block_stride)
                kv_proj = torch.nn.functional.conv2d(x, w.kv_weight)
                sdpa_inputs = _unfolded_sdpa_inputs(ours, x)
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
                    *sdpa_inputs[:3], attn_mask=sdpa_inputs[3], scale=spec.scale)
                fused = lambda: (ours.set_backend("fused"), ours(x))[1]
                triton = lambda: (ours.set_backend("triton"), ours(x))[1]
                kernel = lambda: triton_kernel.attend(q_proj, kv_proj, w, spec)
                errors = {n: (f().float() - expected.float()).abs().max().item()
                          for n, f in (("fused", fused), ("triton", triton))}
                times = time_alternating([lambda: theirs(x), fused, triton, kernel, sdpa], rounds, min_seconds, sync)
            # Bytes the attention itself must move at least: q, k and v read once, output written once
            # (before the average pool of avg_pool layers).
            out_elements = batch * shape.dim_out * q_proj.shape[2] * q_proj.shape[3] * (4 if spec.avg_pool else 1)
            moved = (q_proj.numel() + kv_proj.numel() + out_elements) * x.element_size()
            t_timm, t_fused, t_triton, t_kernel, t_sdpa = times
            row = dict(shape=asdict(shape), label=shape.label(), dtype=str(dtype).split(".")[-1], batch=batch,
                       timm_ms=t_timm * 1e3, fused_ms=t_fused * 1e3, triton_ms=t_triton * 1e3,
                       triton_kernel_ms=t_kernel * 1e3, sdpa_unfolded_ms=t_sdpa * 1e3,
                       triton_speedup=t_timm / t_triton, fused_speedup=t_timm / t_fused,
                       kernel_gbs=moved / t_kernel / 1e9, sdpa_gbs=moved / t_sdpa / 1e9,
                       max_abs_err=errors)
            rows.append(row)
            peak_note = f" ({row['kernel_gbs'] / peak:.0%} of peak)" if peak else ""
            print(f"{shape.label():<44} {row['dtype']:<8} timm {row['timm_ms']:8.3f}  fused {row['fused_ms']:8.3f}"
                  f"  triton {row['triton_ms']:8.3f} (kernel {row['triton_kernel_ms']:7.3f},"
                  f" {row['kernel_gbs']:6.0f} GB/s{peak_note})  sdpa {row['sdpa_unfolded_ms']:8.3f}"
                  f" ({row['sdpa_gbs']:6.0f} GB/s)  triton x{row['triton_speedup']:5.2f}"
                  f"  err {errors['triton']:.1e}", flush=True)
    summary = {}
    for dtype in {r["dtype"] for r in rows}:
        of_dtype = [r for r in rows if r["dtype"] == dtype]
        largest = max(of_dtype, key=lambda r: r["timm_ms"])
        summary[dtype] = dict(triton_geomean_speedup=geomean([r["triton_speedup"] for r in of_dtype]),
                              largest_shape=largest["label"], largest_kernel_gbs=largest["kernel_gbs"],
                              largest_fraction_of_peak=largest["kernel_gbs"] / peak if peak else None)
        print(f"{dtype}: triton vs timm geometric mean x{summary[dtype]['triton_geomean_speedup']:.2f}; "
              f"largest shape {largest['label']}: kernel {largest['kernel_gbs']:.0f} GB/s"
              + (f" = {largest['kernel_gbs'] / peak:.0%} of {peak:.0f} GB/s peak" if peak else ""))
    return dict(device=name, peak_gbs=peak, torch=torch.__version__, batch=batch, rows=rows, summary=summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, rounds=7, seconds=2.0)
    parser.add_argument("--backend", default="auto", help="our backend on CPU: auto, cpp, fused or reference")
    parser.add_argument("--peak-gbs", type=float, help="GPU peak memory bandwidth, if the device name is not known")
    args = parser.parse_args()
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        batch = (args.batch or [64])[0]
        print(f"halo attention on {torch.cuda.get_device_name()}, batch {batch}, torch {torch.__version__}")
        shapes = [s for m in MODELS for s in timm_layer_shapes(m)] + registry_layer_shapes("halonet_h4")
        result = run_gpu(shapes, batch, [torch.float16, torch.bfloat16], args.rounds, args.seconds, args.peak_gbs)
    else:
        print(f"halo attention, timm vs ours ({args.backend}), fp32, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")
        result = run_cpu(args.batch or [1, 8], args.backend, args.rounds, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
