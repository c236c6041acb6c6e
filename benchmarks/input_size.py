"""What a larger model input costs and buys in each mode: the figures behind the input-size defaults.

    python benchmarks/input_size.py [--arch vits16,dinov2-small,dinov3-small] [--sizes 224,448] [--calls 10]
                                    [--backends auto,torch]

Cost: ms for the model work of one request of each mode, on the CPU with each backend (auto: the app's
own, ONNX Runtime int8 when it passes its check; torch: eager float32): an image or region search embeds one query, a patch match
(or co-segmentation) embeds two images and matches their patches; building an index embeds every image
(images/s at batch 16) and stores grid-many patch vectors per image. Random weights in each model's
real shape, so the times are the real ones; quality needs the trained weights and is not measured here.

Fit: how closely the patches chosen for a drawn box (`geometry.patches_in`, as region search and matching
choose them) cover it: mean IoU between the box and the cells chosen, over 2,000 random boxes of each
size (a side of 5%, 10%, 20% or 40% of a 640 x 480 photo's). It depends on the grid alone.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from query_embed import photo_like, save_dinov2_small, save_dinov3_small, time_calls  # noqa: E402
from vits16 import save_vits16  # noqa: E402

SAVERS = {"vits16": save_vits16, "dinov2-small": save_dinov2_small, "dinov3-small": save_dinov3_small}
PHOTO = (640, 480)
BOX_SIDES = (0.05, 0.10, 0.20, 0.40)


def box_fit(grid: tuple[int, int], share: float, boxes: int = 2000, seed: int = 0) -> float:
    """Mean IoU between random boxes `share` of the photo's sides and the union of the cells chosen for them."""
    from dino_demo.geometry import Box, patch_boxes, patches_in

    rng, (w, h) = np.random.default_rng(seed), PHOTO
    cells, total = patch_boxes(PHOTO, grid), 0.0
    for _ in range(boxes):
        bw, bh = share * w, share * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = Box(x0, y0, x0 + bw, y0 + bh)
        chosen = cells[patches_in(box, PHOTO, grid)]
        covered = np.zeros((h, w), bool)  # the chosen cells' pixels, against the box's, at 1 px
        for cx0, cy0, cx1, cy1 in chosen:
            covered[round(cy0):round(cy1), round(cx0):round(cx1)] = True
        inside = np.zeros((h, w), bool)
        inside[round(y0):round(y0 + bh), round(x0):round(x0 + bw)] = True
        total += (covered & inside).sum() / (covered | inside).sum()
    return total / boxes


def timed(call, calls: int) -> float:
    """ms p50 of `calls` calls, after one to warm up."""
    call()
    return float(np.median(time_calls(call, calls)))


def measure(folder: Path, size: int, backend: str, cache: Path, calls: int) -> dict:
    from dino_demo.draw import draw_matches
    from dino_demo.matching import match_patches
    from dino_demo.model import Embedder

    embedder = Embedder(str(folder), device="cpu", backend=backend, cache_dir=cache, input_size=size, batch_size=16)
    a, b = photo_like(1, PHOTO), photo_like(2, PHOTO)
    batch = [photo_like(10 + i, PHOTO) for i in range(16)]

    def match():
        features = embedder.embed([a, b])
        draw_matches(a, b, match_patches(features.one(0), features.one(1)), 40, height=480)

    return {"backend": embedder.backend, "grid": embedder.grid,
            "query": timed(lambda: embedder.embed([a]), calls), "match": timed(match, calls),
            "build": 16 / (timed(lambda: embedder.embed(batch), max(2, calls // 4)) / 1000),
            "patch_bytes": embedder.patches_per_image * embedder.dim * 4}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vits16,dinov2-small,dinov3-small", help=", ".join(SAVERS))
    p.add_argument("--sizes", default="224,448")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--backends", default="auto,torch", help="auto (the app's: ONNX int8 on a CPU), torch, onnx, onnx-int8")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; ms p50 of {args.calls} calls")
    print(f"{'model':<14}{'input':>6}{'grid':>8}{'backend':>11}{'query ms':>10}{'match ms':>10}"
          f"{'build img/s':>13}{'patches KB':>12}   box fit (IoU) at " + " / ".join(f"{s:.0%}" for s in BOX_SIDES))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            folder = SAVERS[arch](Path(tmp) / arch)
            for size, backend in ((size, backend) for size in sizes for backend in args.backends.split(",")):
                m = measure(folder, size, backend, Path(tmp) / "cache", args.calls)
                fit = " / ".join(f"{box_fit(m['grid'], s):.2f}" for s in BOX_SIDES)
                print(f"{arch:<14}{size:>6}{'x'.join(map(str, m['grid'])):>8}{m['backend']:>11}{m['query']:>10.1f}"
                      f"{m['match']:>10.1f}{m['build']:>13.1f}{m['patch_bytes'] / 1024:>12.0f}   {fit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
