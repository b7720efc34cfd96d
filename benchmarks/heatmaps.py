"""What heatmaps cost: the service's forward pass with and without one image asking for maps, side by
side in one run, and the per-image work of the heatmap payload.

For each model (prepared as the service prepares it, ``app.engine.Engine``): ``Engine.forward`` on a
batch of 1 and of 16 where no image asks for heatmaps, against the same batch where one image
asks (its layer's maps come from the same forward: that layer's input, for that row only, through
the map-returning path; where the model is traced, a forward with one layer's maps runs a traced
graph of its own that returns them too, ``Engine._maps_graph``), timed in alternation: what it
costs beyond x1 is that second pass of one layer for one row. Then the payload of one image,
built in the preprocessing pool, not the model thread: numbers (``array``) and pictures (``png``,
drawn on a photo at ``heatmap_max_side`` 512), with the PNGs' bytes.

    python -m benchmarks.heatmaps                            # halonet_compact and halonet26t
    python -m benchmarks.heatmaps --models halonet26t --batch 1 16 --json heatmaps.json
"""
import argparse
import io
import json
from typing import Dict, List

import skimage.data
import torch
from PIL import Image

from app.config import Settings
from app.engine import Engine
from benchmarks.timing import time_alternating


def photo_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def forward_rows(engine: Engine, batches: List[int], rounds: int, seconds: float) -> List[Dict[str, float]]:
    layer = engine.default_heatmap_layer
    rows = []
    for batch in batches:
        inputs = torch.randn(batch, *engine.cfg.input_size, generator=torch.Generator().manual_seed(0))
        without, with_maps = time_alternating([lambda: engine.forward(inputs, [None] * batch),
                                               lambda: engine.forward(inputs, [layer] + [None] * (batch - 1))],
                                              rounds, seconds)
        rows.append(dict(model=engine.name, batch=batch, without_ms=without * 1e3, with_one_ms=with_maps * 1e3,
                         ratio=with_maps / without))
        print(f"{engine.name:<16} batch {batch:>3}: forward {without * 1e3:8.2f} ms, with one image's maps "
              f"{with_maps * 1e3:8.2f} ms: x{with_maps / without:.2f}", flush=True)
    return rows


def payload_row(engine: Engine, rounds: int, seconds: float) -> Dict[str, float]:
    layer, photo = engine.default_heatmap_layer, photo_jpeg()
    tensor, source = engine.decode_with_source(photo, picture_side=512)
    _, (maps,) = engine.forward(tensor[None], [layer])
    array_s, png_s = time_alternating([lambda: engine.heatmaps(source, maps, layer, "array"),
                                       lambda: engine.heatmaps(source, maps, layer, "png")], rounds, seconds)
    pictures = engine.heatmaps(source, maps, layer, "png")
    sizes = {key: len(pictures[key]) * 3 // 4 for key in ("overlay_png", "mosaic_png")}  # base64 -> bytes
    print(f"{engine.name:<16} payload of one image: array {array_s * 1e3:.2f} ms, png {png_s * 1e3:.2f} ms "
          f"(overlay {source.picture.width}x{source.picture.height}: {sizes['overlay_png'] / 1e3:.0f} kB, "
          f"mosaic {sizes['mosaic_png'] / 1e3:.0f} kB)", flush=True)
    return dict(model=engine.name, array_ms=array_s * 1e3, png_ms=png_s * 1e3, **sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["halonet_compact", "halonet26t"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as the service's default on 2 cores")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per contender per row")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results: Dict[str, list] = dict(forward=[], payload=[])
    for name in args.models:
        engine = Engine(Settings(model=name, threads=args.threads, model_workers=1))
        # HaloAttention.forward_with_maps: the Triton kernel writes maps in its pass; other backends' have none.
        maps_from = "the triton kernel" if engine.attention_backends == ["triton"] else "the reference path"
        print(f"{name}: halo attention {', '.join(engine.attention_backends)}, graph "
              f"{'traced' if engine.graph is not None else 'eager'}, heatmap layer {engine.default_heatmap_layer}, "
              f"maps from {maps_from}")
        results["forward"] += forward_rows(engine, args.batch, args.rounds, args.seconds)
        results["payload"].append(payload_row(engine, args.rounds, args.seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
