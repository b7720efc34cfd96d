"""Whole-model speed: timm's HaloNets against ours with identical weights, side by side in one run.

Ours is built from our registry, loaded with the timm model's state dict (strictly), and
prepared as the service runs it (``prepare_for_inference``: eval, BatchNorm folded,
channels_last). timm runs as users get it (NCHW) and, for a fair second figure, in
channels_last too. All are timed alternately over several rounds; each row reports images/s,
both ratios, and the largest absolute logit difference (random weights scaled to keep
activations of order one).

    python -m benchmarks.model                          # CPU, batch 1 and 8, fp32
    python -m benchmarks.model --device cuda            # GPU, batch 64, fp16 and bf16
    python -m benchmarks.model --models halonet_h1 --json out.json
"""
import argparse
import copy
import json
from typing import Dict, List

import torch
from torch import nn

from benchmarks.timing import add_common_arguments, check_device, geomean, time_alternating
from model import create_model
from model.inference import prepare_for_inference

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


def build_models(name: str, device: str, dtype: torch.dtype) -> tuple:
    """timm's model (NCHW), the same in channels_last, and ours prepared for serving: same weights."""
    import timm

    theirs = timm.create_model(name).eval()
    randomize_(theirs)
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = prepare_for_inference(ours, device, dtype, channels_last=True)
    theirs = theirs.to(device, dtype).requires_grad_(False)
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    return theirs, theirs_cl, ours


def run(names: List[str], batches: List[int], device: str, dtypes: List[torch.dtype], rounds: int,
        seconds: float) -> Dict[str, object]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name in names:
        for dtype in dtypes:
            theirs, theirs_cl, ours = build_models(name, device, dtype)
            size = ours.pretrained_cfg.input_size
            for batch in batches:
                x = torch.randn(batch, *size, device=device, dtype=dtype)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    expected, actual = theirs(x), ours(x_cl)
                    err = (expected.float() - actual.float()).abs().max().item()
                    same_top5 = bool((expected.topk(5).indices == actual.topk(5).indices).all())
                    t_timm, t_timm_cl, t_ours = time_alternating(
                        [lambda: theirs(x), lambda: theirs_cl(x_cl), lambda: ours(x_cl)], rounds, seconds, sync)
                row = dict(model=name, dtype=str(dtype).split(".")[-1], batch=batch,
                           timm_images_per_s=batch / t_timm, timm_channels_last_images_per_s=batch / t_timm_cl,
                           ours_images_per_s=batch / t_ours, speedup=t_timm / t_ours,
                           speedup_vs_channels_last=t_timm_cl / t_ours, max_abs_logit_diff=err, same_top5=same_top5)
                rows.append(row)
                print(f"{name:<18} {row['dtype']:<8} b{batch:<3} timm {row['timm_images_per_s']:7.1f}"
                      f" (channels_last {row['timm_channels_last_images_per_s']:7.1f}) img/s"
                      f"  ours {row['ours_images_per_s']:7.1f} img/s  x{row['speedup']:5.2f}"
                      f" (x{row['speedup_vs_channels_last']:4.2f})  logit err {err:.1e}"
                      f"  top5 {'same' if same_top5 else 'DIFFERENT'}", flush=True)
    print(f"geometric-mean speedup x{geomean([r['speedup'] for r in rows]):.2f} "
          f"(x{geomean([r['speedup_vs_channels_last'] for r in rows]):.2f} against timm in channels_last)")
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TIMM_MODELS), choices=TIMM_MODELS)
    add_common_arguments(parser, rounds=5, seconds=3.0)
    args = parser.parse_args()
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        result = run(args.models, args.batch or [64], "cuda", [torch.float16, torch.bfloat16], args.rounds,
                     args.seconds)
    else:
        print(f"HaloNets, timm vs ours, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
        result = run(args.models, args.batch or [1, 8], "cpu", [torch.float32], args.rounds, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
