"""`python -m index_builder duplicates --index DIR [--threshold auto|T] [--sample N] [--neighbours N] [--json FILE]`.

Lists groups of near-duplicate images (crops, rescales, re-encodes, colour changes of one picture)
by the cosine similarity of their global vectors; exact copies were already refused when added.
The default threshold, auto, is calibrated on the index itself with its own model: copies of a
sample of its images, made by the copy-detection edits of dino_demo/copies.py, must each be closer
to no other image than the threshold (dino_demo.duplicates.calibrate_threshold).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SAMPLE = 50  # images copied to calibrate: x 9 edits, 450 embeddings (ViT-S/16 on 2 CPU cores: a minute)
DEFAULT_NEIGHBOURS = 20
PROGRESS_FROM = 5_000  # images: smaller indexes are searched in a blink, a bar would only flicker
SHOWN_PER_GROUP = 20  # members printed per group on stdout; --json has them all


def parse_threshold(text: str) -> float | None:
    """'auto' (None: calibrate on the index) or a cosine."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a cosine between -1 and 1") from None


def build_parser(command: str = "duplicates") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m index_builder {command}",
        description="List groups of near-duplicate images in an index: modified copies of one picture (crops, "
        "rescales, JPEG re-encodes, colour changes), found by the cosine similarity of their global vectors. "
        "Remove the extras with `python -m index_builder remove --index DIR --ids ...`.")
    p.add_argument("--index", required=True, help="the index folder to search for near duplicates")
    p.add_argument("--threshold", type=parse_threshold, default=None, metavar="auto|T",
                   help="least cosine similarity of two near duplicates. auto (the default): calibrated on this "
                   "index with its model, just above the closest that edited copies of --sample of its images come "
                   "to any other image; needs the model and stored thumbnails, and about a minute on a CPU. "
                   "A number skips that")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                   help=f"images copied to calibrate --threshold auto (default {DEFAULT_SAMPLE}); more: slower, a "
                   "threshold that has seen more close pairs")
    p.add_argument("--seed", type=int, default=0, help="random seed of the calibration's sample and edits (default 0)")
    p.add_argument("--model", help="for --threshold auto: a local copy of the index's model (default: the index's "
                   "own, by hub id)")
    p.add_argument("--device", default="auto",
                   help="for --threshold auto: cuda, mps or cpu (default: the best there is)")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help=f"nearest images each image looks at (default {DEFAULT_NEIGHBOURS}); bigger groups are "
                   "still joined through chains of pairs")
    p.add_argument("--json", metavar="FILE", help="also write the groups to FILE: ids, labels, source rows, scores, "
                   "and the threshold with how it was chosen")
    return p


def run(args: argparse.Namespace) -> int:
    from dino_demo.duplicates import check_settings
    from dino_demo.index import load_index

    check_settings(args.threshold, args.neighbours)  # before opening a big index
    index = load_index(args.index)
    calibration = calibrate(index, args) if args.threshold is None else None  # printed as it is chosen
    threshold = args.threshold if calibration is None else calibration.threshold
    groups = _find(index, threshold, args.neighbours)
    described = describe_groups(index, groups)
    print_groups(described, index.count, threshold)
    if args.json:
        payload = {"index": str(args.index), "threshold": threshold,
                   "threshold_from": "given" if calibration is None else "calibrated",
                   "calibration": None if calibration is None else calibration.to_dict(),
                   "neighbours": args.neighbours, "images_searched": index.count, "groups": described}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {len(described)} groups to {args.json}", file=sys.stderr)
    return 0


def calibrate(index, args: argparse.Namespace):
    """The threshold calibrated on this index with its own model (dino_demo.duplicates.calibrate_threshold),
    printed with the figures it was chosen from."""
    from tqdm import tqdm

    from dino_demo.duplicates import calibrate_threshold, check_calibration

    check_calibration(index, args.sample)  # before loading a model for seconds
    embedder = load_embedder(index, args.model, args.device)
    images = min(args.sample, index.count)
    print(f"calibrating the threshold: copies of {images} images of {args.index}, embedded with {embedder.model_id} "
          f"on {embedder.device} (give --threshold a number to skip this)", file=sys.stderr)
    with tqdm(total=images, unit="img", desc="calibrating", dynamic_ncols=True) as bar:
        calibration = calibrate_threshold(index, lambda batch: embedder.embed(batch).cls, copy_maker(), args.sample,
                                          args.seed, lambda done, total: bar.update(done - bar.n))
    print_calibration(calibration)
    return calibration


def load_embedder(index, model: str | None, device: str):
    """The index's own model (or the local copy given), refused if its vectors would not match the index's."""
    from dino_demo.errors import UserError
    from dino_demo.index import check_model
    from dino_demo.model import pick_device

    from .cli import index_embedder

    built = index.manifest["model"]
    try:
        embedder = index_embedder(index.path, built, model, pick_device(device))
    except UserError as e:
        raise type(e)(f"{e} Or give --threshold a cosine instead of auto, which embeds copies of the index's images "
                      "with its model.") from None
    check_model(index.manifest, embedder.describe(), index.path)
    return embedder


def copy_maker():
    """The copy-detection edits (dino_demo/copies.py, shared with the evaluation), in the form the core's
    calibration takes. All but "exact": an index refuses exact copies by content hash."""
    from dino_demo.copies import TRANSFORMS, make_copies

    names = [name for name in TRANSFORMS if name != "exact"]
    return lambda image, seed: [(c.transform, c.image) for c in make_copies(image, seed, names)]


def print_calibration(calibration) -> None:
    """How the threshold was chosen: one line, then each edit's cosine to its original, then the closest miss."""
    figures = calibration.by_transform()
    below = [name for name, f in figures.items() if f["median"] < calibration.threshold]
    why = f"; {', '.join(below)} copies mostly fall below" if below else ""
    print(f"threshold {calibration.threshold:.3f}, calibrated on {calibration.images} images x {len(figures)} copy "
          f"kinds of this index (recall {calibration.recall:.2f} of the copies{why})")
    print("  each edit's copies: cosine to their original (median, lowest), share at or above the threshold")
    print(f"  {'edit':<10} {'median':>7} {'lowest':>7} {'recall':>7}")
    for name, f in figures.items():
        print(f"  {name:<10} {f['median']:7.3f} {f['min']:7.3f} {f['recall']:7.2f}")
    closest = calibration.to_dict()["closest_copy_to_other"]
    a, b = closest["original"], closest["other"]
    if calibration.floored:
        rule = f"under the floor {calibration.threshold:g}, which is used instead"
    else:  # images more like the original than its typical copy were passed over; a looser duplicate may not be
        rule = f"the threshold is the next step above it (if ids {a} and {b} are one picture, give a lower --threshold)"
    print(f"  closest copy to another image: {closest['cosine']:.4f}, a {closest['transform']} copy of id {a} "
          f"vs id {b}; {rule}")


def _find(index, threshold: float, neighbours: int) -> list:
    """The groups, with a progress bar on stderr when the index is large enough to wait for."""
    from dino_demo.duplicates import find_duplicate_groups

    if index.count < PROGRESS_FROM:
        return find_duplicate_groups(index, threshold, neighbours)
    from tqdm import tqdm

    with tqdm(total=index.count, unit="img", desc="comparing", dynamic_ncols=True) as bar:
        return find_duplicate_groups(index, threshold, neighbours, lambda done, total: bar.update(done - bar.n))


def describe_groups(index, groups) -> list[dict]:
    """Each group as plain data: members with label and source row, and its pairs' similarities."""
    meta = index.meta
    wanted = {i for g in groups for i in g.ids}
    ids = meta.column("id").to_pylist()
    sources = meta.column("source").to_pylist() if "source" in meta.column_names else [0] * len(ids)  # format 1: one
    rows = {i: (label, row, source) for i, label, row, source in zip(
        ids, meta.column("label").to_pylist(), meta.column("source_row").to_pylist(), sources) if i in wanted}
    return [{"ids": g.ids, "labels": [rows[i][0] for i in g.ids], "source_rows": [rows[i][1] for i in g.ids],
             "sources": [rows[i][2] or 0 for i in g.ids], "best": round(g.best, 6), "weakest": round(g.weakest, 6),
             "pairs": [[a, b, round(s, 6)] for a, b, s in g.pairs]} for g in groups]


def print_groups(groups: list[dict], searched: int, threshold: float) -> None:
    """A readable summary: each group's members and similarity range, then the totals."""
    for n, group in enumerate(groups, 1):
        span = f"{group['weakest']:.3f}" if group["weakest"] == group["best"] else \
            f"{group['weakest']:.3f}-{group['best']:.3f}"
        print(f"group {n}: {len(group['ids'])} images, similarity {span}")
        members = list(zip(group["ids"], group["labels"], group["source_rows"], group["sources"]))
        for image_id, label, row, source in members[:SHOWN_PER_GROUP]:
            where = f"source {source} row {row}" if source else f"row {row}"
            print(f"  id {image_id:<8} {where:<16} {label if label is not None else ''}".rstrip())
        if len(members) > SHOWN_PER_GROUP:
            print(f"  ... and {len(members) - SHOWN_PER_GROUP} more (--json lists them all)")
    images = sum(len(g["ids"]) for g in groups)
    print(f"{len(groups)} group{'s' if len(groups) != 1 else ''}, {images} image{'s' if images != 1 else ''} "
          f"(cosine >= {threshold:g} among {searched} images)")
