"""Halo attention speed: timm's ``HaloAttn`` against ours, same weights, side by side in one run.

The shapes are read off timm's own models (the input of every ``HaloAttn`` of ``halonet_h1`` and
``halonet26t`` at 256 px, ``model.inference.halo_layer_inputs``), so they are exactly the layers users
run; on GPU the paper's HaloNet-H4 layers at 384 px (from our registry) are added. Every row times its implementations
alternately, several rounds, and reports medians, ratios and the largest absolute difference
from timm's output. On GPU the table starts with the roofline (``benchmarks/roofline.py``): each layer's
analytic FLOPs and bytes and its bound time on the device's measured ceilings; each row then shows its
fraction of that bound.

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

from benchmarks import roofline
from benchmarks.timing import add_common_arguments, check_device, geomean, synchronizer, time_alternating
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


def _layer_kwargs(shape: LayerShape) -> Dict[str, int]:
    return dict(dim=shape.dim, dim_out=shape.dim_out, stride=shape.stride, num_heads=shape.num_heads,
                dim_head=shape.dim_head, block_size=shape.block_size, halo_size=shape.halo_size)


def build_pair(shape: LayerShape, backend: str) -> Tuple[torch.nn.Module, HaloAttention]:
    theirs = HaloAttn(**_layer_kwargs(shape)).eval()
    ours = HaloAttention(**_layer_kwargs(shape), backend=backend).eval()
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _device_ceilings(name: str, device: str, dtypes: List[torch.dtype], lead: Optional[roofline.Ceilings]
                     ) -> Dict[torch.dtype, roofline.Ceilings]:
    """The ceilings each dtype's bounds use, printed beside the datasheet lead: measured on a GPU (the
    bandwidth once, the FLOP rate per dtype), the given ones on a CPU, where this table only smoke-runs."""
    if device != "cuda":
        if lead is None:
            raise ValueError("on a CPU the ceilings are not measured: give peak_gbs and peak_tflops")
        print(f"roofline ceilings on {name}: given {lead.describe()}")
        return {dtype: lead for dtype in dtypes}
    bandwidth = roofline.measure_bandwidth(device)
    ceilings = {dtype: roofline.Ceilings(bandwidth, roofline.measure_flop_rate(dtype, device)) for dtype in dtypes}
    for dtype, c in ceilings.items():
        print(f"roofline ceilings on {name}, {_dtype_name(dtype)}: measured {c.describe()} (copy, matrix product);"
              f" datasheet {lead.describe() if lead else 'unknown: give --peak-gbs and --peak-tflops'}")
    return ceilings


def _bound(cost: roofline.Cost, ceilings: roofline.Ceilings) -> Dict[str, object]:
    seconds, binds = roofline.bound_seconds(cost, ceilings)
    return dict(flops=cost.flops, bytes=cost.bytes, intensity=cost.intensity, bound_ms=seconds * 1e3, binds=binds)


def _bound_cell(bound: Dict[str, object]) -> str:
    return (f"{bound['flops'] / 1e9:9.2f} GFLOP {bound['bytes'] / 1e6:9.1f} MB {bound['intensity']:6.1f} FLOP/B"
            f" {bound['bound_ms']:8.4f} ms {bound['binds']:<7}")


def _print_roofline(bounds: Dict[Tuple[torch.dtype, LayerShape], Dict[str, Dict[str, object]]], batch: int) -> None:
    print(f"roofline, batch {batch}: analytic FLOPs, fewest bytes, FLOPs per byte, bound time and what binds it")
    print(f"{'layer':<44} {'dtype':<8} {'kernel (q, kv -> attention before any pool)':<62}  layer (x -> output)")
    for (dtype, shape), bound in bounds.items():
        print(f"{shape.label():<44} {_dtype_name(dtype):<8} {_bound_cell(bound['kernel'])}"
              f"  {_bound_cell(bound['layer']).rstrip()}")


def _summarize(rows: List[Dict[str, object]], lead: Optional[roofline.Ceilings],
               measured_bandwidth: Optional[float]) -> Dict[str, object]:
    """One dtype's rows: the speedup over timm, and the kernel's bandwidth on the largest shape (the most bytes
    to move, where bandwidth matters most) against the datasheet's peak and the measured copy's."""
    largest = max(rows, key=lambda r: r["kernel_cost"]["bytes"])
    achieved = largest["kernel_gbs"] * 1e9
    summary = dict(triton_geomean_speedup=geomean([r["triton_speedup"] for r in rows]),
                   largest_shape=largest["label"], largest_kernel_gbs=largest["kernel_gbs"],
                   largest_fraction_of_peak=achieved / lead.bandwidth if lead else None,
                   largest_fraction_of_measured_bandwidth=achieved / measured_bandwidth if measured_bandwidth else None,
                   largest_kernel_fraction_of_bound=largest["kernel_fraction_of_bound"],
                   largest_triton_fraction_of_bound=largest["triton_fraction_of_bound"])
    peaks = ((lead.bandwidth if lead else None, "datasheet peak"), (measured_bandwidth, "measured copy"))
    against = [f"{achieved / peak:.0%} of {peak / 1e9:.0f} GB/s {what}" for peak, what in peaks if peak]
    print(f"{largest['dtype']}: triton vs timm geometric mean x{summary['triton_geomean_speedup']:.2f}; "
          f"largest shape {largest['label']}: kernel {largest['kernel_gbs']:.0f} GB/s"
          f"{' = ' + ', '.join(against) if against else ''}; of its bound: kernel"
          f" {largest['kernel_fraction_of_bound']:.0%}, triton layer {largest['triton_fraction_of_bound']:.0%}")
    return summary


def run_gpu(shapes: List[LayerShape], batch: int, dtypes: List[torch.dtype], rounds: int, min_seconds: float,
            peak_gbs: Optional[float], peak_tflops: Optional[float] = None, device: str = "cuda"
            ) -> Dict[str, object]:
    """The GPU table, after its roofline: each (dtype, shape)'s analytic cost and bound time, then each timed
    row with its fraction of that bound. ``peak_gbs`` and ``peak_tflops`` override the datasheet lead;
    ``device`` is a parameter only so that tests can smoke-run the table on CPU, where those two are the
    ceilings."""
    from model.attention import triton as triton_kernel

    name = torch.cuda.get_device_name() if device == "cuda" else device
    sync = synchronizer(device)
    lead = roofline.datasheet_ceilings(name, peak_gbs, peak_tflops)
    ceilings = _device_ceilings(name, device, dtypes, lead)
    specs = {shape: HaloAttention(**_layer_kwargs(shape)).spec for shape in shapes}
    bounds = {}
    for dtype in dtypes:
        for shape in shapes:
            cost = roofline.halo_layer_cost(specs[shape], shape.dim, shape.height, shape.width, batch,
                                            torch.empty(0, dtype=dtype).element_size())
            bounds[dtype, shape] = dict(kernel=_bound(cost.kernel, ceilings[dtype]),
                                        layer=_bound(cost.layer, ceilings[dtype]))
    _print_roofline(bounds, batch)
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
            t_timm, t_fused, t_triton, t_kernel, t_sdpa = (t * 1e3 for t in times)
            kernel_bound, layer_bound = bounds[dtype, shape]["kernel"], bounds[dtype, shape]["layer"]
            # Achieved bandwidth: the kernel's fewest bytes over its time. The SDPA baseline's figure uses the
            # same bytes (it moves more: materialized windows), so it compares times, not traffic.
            kernel_gbs, sdpa_gbs = (kernel_bound["bytes"] / t / 1e6 for t in (t_kernel, t_sdpa))
            row = dict(shape=asdict(shape), label=shape.label(), dtype=_dtype_name(dtype), batch=batch,
                       timm_ms=t_timm, fused_ms=t_fused, triton_ms=t_triton, triton_kernel_ms=t_kernel,
                       sdpa_unfolded_ms=t_sdpa, triton_speedup=t_timm / t_triton, fused_speedup=t_timm / t_fused,
                       kernel_gbs=kernel_gbs, sdpa_gbs=sdpa_gbs, kernel_cost=kernel_bound, layer_cost=layer_bound,
                       kernel_fraction_of_bound=kernel_bound["bound_ms"] / t_kernel,
                       triton_fraction_of_bound=layer_bound["bound_ms"] / t_triton,
                       fused_fraction_of_bound=layer_bound["bound_ms"] / t_fused,
                       timm_fraction_of_bound=layer_bound["bound_ms"] / t_timm,
                       max_abs_err=errors)
            rows.append(row)
            peak_note = f" ({kernel_gbs * 1e9 / lead.bandwidth:.0%} of datasheet peak)" if lead else ""
            print(f"{shape.label():<44} {row['dtype']:<8} timm {t_timm:8.3f}  fused {t_fused:8.3f}"
                  f"  triton {t_triton:8.3f} (kernel {t_kernel:7.3f}, {kernel_gbs:6.0f} GB/s{peak_note})"
                  f"  sdpa {t_sdpa:8.3f} ({sdpa_gbs:6.0f} GB/s)  triton x{row['triton_speedup']:5.2f}"
                  f"  err {errors['triton']:.1e}  of bound: kernel {row['kernel_fraction_of_bound']:.0%},"
                  f" triton {row['triton_fraction_of_bound']:.0%}, fused {row['fused_fraction_of_bound']:.0%},"
                  f" timm {row['timm_fraction_of_bound']:.0%}", flush=True)
    summary = {_dtype_name(dtype): _summarize([r for r in rows if r["dtype"] == _dtype_name(dtype)], lead,
                                              ceilings[dtype].bandwidth if device == "cuda" else None)
               for dtype in dtypes}
    return dict(device=name, torch=torch.__version__, batch=batch,
                datasheet=dict(bandwidth_gbs=lead.bandwidth / 1e9, tflops=lead.flop_rate / 1e12) if lead else None,
                ceilings={_dtype_name(d): dict(bandwidth_gbs=c.bandwidth / 1e9, tflops=c.flop_rate / 1e12,
                                               source="measured" if device == "cuda" else "given")
                          for d, c in ceilings.items()},
                rows=rows, summary=summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, rounds=7, seconds=2.0)
    parser.add_argument("--backend", default="auto", help="our backend on CPU: auto, cpp, fused or reference")
    parser.add_argument("--peak-gbs", type=float, help="GPU datasheet memory bandwidth, GB/s: overrides the table's")
    parser.add_argument("--peak-tflops", type=float, help="GPU datasheet fp16/bf16 TFLOP/s: overrides the table's")
    args = parser.parse_args()
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        batch = (args.batch or [64])[0]
        print(f"halo attention on {torch.cuda.get_device_name()}, batch {batch}, torch {torch.__version__}")
        shapes = [s for m in MODELS for s in timm_layer_shapes(m)] + registry_layer_shapes("halonet_h4")
        result = run_gpu(shapes, batch, [torch.float16, torch.bfloat16], args.rounds, args.seconds, args.peak_gbs,
                         args.peak_tflops)
    else:
        print(f"halo attention, timm vs ours ({args.backend}), fp32, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")
        result = run_cpu(args.batch or [1, 8], args.backend, args.rounds, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
