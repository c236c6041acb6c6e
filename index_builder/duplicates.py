"""`python -m index_builder duplicates --index DIR [--threshold T] [--neighbours N] [--json FILE]`.

Lists groups of near-duplicate images (crops, rescales, re-encodes, colour changes of one picture)
by the cosine similarity of their global vectors; exact copies were already refused when added.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# NOT calibrated on DINO features: no DINO checkpoint could be loaded where this was written (no hub),
# so this is a conservative guess that favours precision (strong crops may fall below it).
# Calibrate it for your model with `python benchmarks/duplicates.py --model DIR` (benchmarks/RESULTS.md,
# "Near-duplicate threshold"), which prints the threshold that keeps precision 1.0 with the best recall.
DEFAULT_THRESHOLD = 0.9
DEFAULT_NEIGHBOURS = 20
PROGRESS_FROM = 5_000  # images: smaller indexes are searched in a blink, a bar would only flicker
SHOWN_PER_GROUP = 20  # members printed per group on stdout; --json has them all


def build_parser(command: str = "duplicates") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m index_builder {command}",
        description="List groups of near-duplicate images in an index: modified copies of one picture (crops, "
        "rescales, JPEG re-encodes, colour changes), found by the cosine similarity of their global vectors. "
        "Remove the extras with `python -m index_builder remove --index DIR --ids ...`.")
    p.add_argument("--index", required=True, help="the index folder to search for near duplicates")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"least cosine similarity of two near duplicates (default {DEFAULT_THRESHOLD}: not "
                   "calibrated on DINO features; benchmarks/duplicates.py measures one for your model)")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help=f"nearest images each image looks at (default {DEFAULT_NEIGHBOURS}); bigger groups are "
                   "still joined through chains of pairs")
    p.add_argument("--json", metavar="FILE", help="also write the groups to FILE: ids, labels, source rows, scores")
    return p


def run(args: argparse.Namespace) -> int:
    from dino_demo.duplicates import check_settings, find_duplicate_groups
    from dino_demo.index import load_index

    check_settings(args.threshold, args.neighbours)  # before opening a big index
    index = load_index(args.index)
    groups = _find(index, args.threshold, args.neighbours, find_duplicate_groups)
    described = describe_groups(index, groups)
    print_groups(described, index.count, args.threshold)
    if args.json:
        payload = {"index": str(args.index), "threshold": args.threshold, "neighbours": args.neighbours,
                   "images_searched": index.count, "groups": described}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {len(described)} groups to {args.json}", file=sys.stderr)
    return 0


def _find(index, threshold: float, neighbours: int, find) -> list:
    """The groups, with a progress bar on stderr when the index is large enough to wait for."""
    if index.count < PROGRESS_FROM:
        return find(index, threshold, neighbours)
    from tqdm import tqdm

    with tqdm(total=index.count, unit="img", desc="comparing", dynamic_ncols=True) as bar:
        return find(index, threshold, neighbours, lambda done, total: bar.update(done - bar.n))


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
