"""Show a model's near-duplicate cosines: CLS cosine of copies to their originals vs distractors.

    python benchmarks/duplicates.py [--model ID|DIR|random] [--images assets/collection] [--device cpu]

Each photo of --images is copied once per transform of dino_demo/copies.py (crop, scale, jpeg,
colour...); originals and copies are embedded with the core Embedder. Positives: a copy and its
original. Negatives (distractors): any two images from different originals (original-original,
copy-original, copy-copy). Printed: the negatives' highest cosine, each transform's copy->original
cosines, and the lowest threshold above every negative (precision 1.0 here) with its recall.

`python -m index_builder duplicates` does not need this: its default `--threshold auto` calibrates on
the index itself, with the index's own model and the same edits (dino_demo.duplicates.calibrate_threshold).
This script is the way to look at a model's two distributions whole on a folder of photos, e.g. to
compare backbones, or to see how far apart copies and distractors lie before choosing a fixed threshold.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dino_demo.duplicates import threshold_above  # noqa: E402
from dino_demo.errors import UserError  # noqa: E402
from dino_demo.copies import TRANSFORMS, make_copies  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Measured:
    """Cosines of one run: positives per transform, and every negative pair's."""

    positives: dict[str, np.ndarray]  # transform -> (originals,) cosine of each copy to its original
    negatives: np.ndarray  # (pairs,) cosine of every two images from different originals
    originals_max: float  # highest cosine between two different originals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="facebook/dino-vits16", help="hub id or local folder (default "
                   "facebook/dino-vits16); 'random': a random-weight ViT-S/16, to try the script offline only")
    p.add_argument("--images", default=str(ROOT / "assets" / "collection"), help="folder of originals "
                   "(default assets/collection)")
    p.add_argument("--transforms", default=",".join(t for t in TRANSFORMS if t != "exact"),
                   help="comma-separated transforms of dino_demo/copies.py (default: all but exact, which the "
                   "index refuses by content hash)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-size", type=int, help="model input side in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the transforms")
    p.add_argument("--out", help="also write the figures to this JSON file")
    return p


def load_originals(folder: Path) -> list:
    """The folder's images as RGB, in name order."""
    from dino_demo.images import load_image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise UserError(f"{folder} holds {len(files)} images; give --images a folder of at least 2 (JPEG/PNG/WebP).")
    return [load_image(f) for f in files]


def measure(embedder, originals: list, transforms: list[str], seed: int) -> Measured:
    """Embed originals and one copy of each per transform; split the cosines into positives and negatives."""
    copies = [make_copies(image, seed + i, transforms) for i, image in enumerate(originals)]
    images = originals + [c.image for per_image in copies for c in per_image]
    cls = embedder.embed(images).cls  # (n, d) float32, L2-normalised
    n, t = len(originals), len(transforms)
    source = np.concatenate([np.arange(n), np.repeat(np.arange(n), t)])  # the original each image comes from
    sims = cls @ cls.T
    different = source[:, None] != source[None, :]
    copy_rows = n + np.arange(n)[:, None] * t + np.arange(t)[None, :]  # (originals, transforms) rows of copies
    positives = {name: sims[copy_rows[:, j], np.arange(n)] for j, name in enumerate(transforms)}
    originals_sims = sims[:n, :n][different[:n, :n]]
    return Measured(positives, sims[np.triu(different, 1)], float(originals_sims.max()))


def recommend(measured: Measured) -> float:
    """The lowest threshold above every negative, by the command's own rule: precision 1.0, best recall."""
    return threshold_above(float(measured.negatives.max()))


def report(measured: Measured, threshold: float) -> dict:
    """Figures per transform at the recommended threshold."""
    rows = {}
    for name, cos in measured.positives.items():
        rows[name] = {"count": len(cos), "min": float(cos.min()), "p5": float(np.percentile(cos, 5)),
                      "median": float(np.median(cos)), "max": float(cos.max()),
                      "recall": float((cos >= threshold).mean())}
    every = np.concatenate(list(measured.positives.values()))
    return {"negatives": {"pairs": len(measured.negatives), "max": float(measured.negatives.max()),
                          "p99": float(np.percentile(measured.negatives, 99)), "originals_max": measured.originals_max},
            "transforms": rows, "recommended": threshold, "recall": float((every >= threshold).mean())}


def print_report(figures: dict, model: str, originals: int) -> None:
    neg = figures["negatives"]
    print(f"model {model}, {originals} originals, one copy each per transform")
    print(f"distractors: {neg['pairs']} pairs from different originals; highest cosine {neg['max']:.4f} "
          f"(99th percentile {neg['p99']:.4f}); highest between two originals {neg['originals_max']:.4f}")
    print(f"{'transform':<10} {'min':>7} {'p5':>7} {'median':>7} {'max':>7}  recall@{figures['recommended']:.3f}")
    for name, r in figures["transforms"].items():
        print(f"{name:<10} {r['min']:7.4f} {r['p5']:7.4f} {r['median']:7.4f} {r['max']:7.4f}  {r['recall']:12.2f}")
    print(f"all transforms: recall {figures['recall']:.2f} at {figures['recommended']:.3f}, the lowest threshold above "
          "every distractor (precision 1.0 on this set; a larger collection holds closer distractors, which "
          "`duplicates --threshold auto` measures on the index itself)")


def load_embedder(args, tmp: Path):
    from dino_demo.model import Embedder

    model = args.model
    if model == "random":
        from vits16 import save_vits16  # benchmarks/ is on the path when run as a script

        print("model 'random': random weights, so these figures are NOT DINO's and no threshold for it", file=sys.stderr)
        model = str(save_vits16(tmp / "vits16"))
    return Embedder(model, device=args.device, input_size=args.input_size, batch_size=16, backend="torch")


def main() -> int:
    args = build_parser().parse_args()
    transforms = [t for t in args.transforms.split(",") if t]
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown or not transforms:
        print(f"error: --transforms {','.join(unknown) or '(none)'}: choose from {', '.join(TRANSFORMS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            originals = load_originals(Path(args.images))
            embedder = load_embedder(args, Path(tmp))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        measured = measure(embedder, originals, transforms, args.seed)
    figures = report(measured, recommend(measured))
    print_report(figures, args.model, len(originals))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "images": args.images, "seed": args.seed,
                                              "originals": len(originals), **figures}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
