"""`python -m evaluation`: how well do these indexes retrieve? mAP per index and search.

Queries are embedded with the core `Embedder` and answered by the core `search_image` and
`search_region`, exactly as the app answers them, so the figures are the app's figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dino_demo.errors import UserError
from dino_demo.index import Index, load_index
from dino_demo.search import MAX_RESULTS, SearchError, check_k, search_image, search_region

from dino_demo.copies import TRANSFORMS
from .metrics import Summary
from .sets import EvalSet, centre_box, load_copies, load_given_copies, load_labelled, load_revisited

SEARCHES = ("image", "region")


@dataclass
class Result:
    """The figures of one index and one kind of search."""

    index: str
    factories: dict[str, str]
    search: str
    metrics: dict[str, Summary]

    def to_json(self) -> dict:
        return {"index": self.index, "factories": self.factories, "search": self.search,
                "metrics": {name: s.to_json() for name, s in self.metrics.items()}}


@dataclass
class Report:
    eval_set: EvalSet
    model: str
    results: list[Result]

    def to_json(self, depth: int) -> dict:
        return {
            "protocol": self.eval_set.protocol, "model": self.model, "query_count": len(self.eval_set.queries),
            "depth": depth, "region_box": self.eval_set.box_note, "notes": self.eval_set.notes,
            "results": [r.to_json() for r in self.results],
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Measure retrieval quality (mAP) of one or more index folders, with image and region search.",
    )
    p.add_argument("--index", nargs="+", required=True, help="index folders to evaluate (exact, compressed...)")
    p.add_argument("--queries", required=True, help="hub id ORG/NAME or local folder: revisited ground truth "
                   "(gnd_*.pkl + jpg/), the collection the index was built from (copies), or a labelled collection")
    p.add_argument("--protocol", choices=("revisited", "copies", "labels"),
                   help="default: revisited when --queries holds a gnd_*.pkl, else labels")
    p.add_argument("--split", default=None, help="split of --queries (default: query for revisited, else train)")
    p.add_argument("--database", help="revisited: the image folder the index was built from (default: QUERIES/jpg)")
    p.add_argument("--image-column", help="labels: column holding the images")
    p.add_argument("--label-column", help="labels: column holding the labels (default: label/caption if present)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="labels: the queries are the indexed collection; ignore each query's own image")
    p.add_argument("--synthetic", type=int, default=100, metavar="N", help="copies: originals to copy (default 100)")
    p.add_argument("--original-column", help="copies: --queries holds ready-made copies, this column the source row "
                   "of each one's original in the indexed collection (instead of --synthetic)")
    p.add_argument("--group-column", help="copies: with --original-column, the column naming each copy's transform")
    p.add_argument("--transforms", default=",".join(TRANSFORMS), help=f"copies: comma-separated (default {','.join(TRANSFORMS)})")
    p.add_argument("--seed", type=int, default=0, help="copies: random seed of the transforms")
    p.add_argument("--limit", type=int, help="revisited, labels, given copies: at most N queries")
    p.add_argument("--searches", default="image,region", help="image, region or both (default)")
    p.add_argument("--depth", type=int, default=MAX_RESULTS,
                   help=f"results ranked per query (default and most {MAX_RESULTS}, the most one search returns)")
    p.add_argument("--model", help="hub id or folder of the model (default: the one the first index was built with)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per model batch")
    p.add_argument("--out", default="eval-results.json", help="where to write the figures as JSON (default eval-results.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report.results))
    for note in report.eval_set.notes:
        print(note)
    Path(args.out).write_text(json.dumps(dict(report.to_json(args.depth), queries=args.queries), indent=2))
    print(f"figures written to {args.out}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> Report:
    from dino_demo.model import Embedder

    searches, depth = _searches(args.searches), _depth(args.depth)
    first = load_index(args.index[0])
    built = first.manifest["model"]
    embedder = Embedder.for_index(built, args.model, device=args.device, batch_size=args.batch_size)
    indexes = [load_index(path, embedder.describe()) for path in args.index]
    eval_set = load_eval_set(args, indexes)
    print(f"{eval_set.protocol}: {len(eval_set.queries)} queries, {len(indexes)} index(es), "
          f"{embedder.model_id} on {embedder.device}", file=sys.stderr)
    rankings = rank_all(eval_set, indexes, embedder, searches, depth)
    results = [Result(str(index.path), _factories(index), search, eval_set.score(index, rankings[i, search]))
               for i, index in enumerate(indexes) for search in searches]
    return Report(eval_set, embedder.model_id, results)


def load_eval_set(args: argparse.Namespace, indexes: list[Index]) -> EvalSet:
    protocol = args.protocol or ("revisited" if list(Path(args.queries).expanduser().glob("gnd_*.pkl")) else "labels")
    split = args.split or ("query" if protocol == "revisited" and not Path(args.queries).exists() else "train")
    if protocol == "revisited":
        return load_revisited(args.queries, split, args.database, args.limit)
    if protocol == "copies" and args.original_column:
        return load_given_copies(args.queries, split, args.original_column, args.group_column, args.limit)
    if protocol == "copies":
        indexed = set.intersection(*(set(ix.meta.column("source_row").to_pylist()) for ix in indexes))
        transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
        return load_copies(args.queries, split, indexed, args.synthetic, transforms, args.seed)
    return load_labelled(args.queries, split, args.image_column, args.label_column, args.leave_one_out, args.limit)


def rank_all(eval_set: EvalSet, indexes: list[Index], embedder, searches: list[str], depth: int) -> dict:
    """Source rows of the hits of every query, per (index number, search), best first."""
    rankings = {(i, s): [] for i in range(len(indexes)) for s in searches}
    rows = [index.source_rows() for index in indexes]
    images, started, done = eval_set.images(), time.perf_counter(), 0
    while batch := [image for _, image in zip(range(embedder.batch_size), images)]:
        features = embedder.embed(batch)
        for j, query in enumerate(eval_set.queries[done : done + len(batch)]):
            one = features.one(j)
            box = query.box or centre_box(features.sizes[j])
            for i, index in enumerate(indexes):
                for search in searches:
                    hits = (search_image(index, one, k=depth) if search == "image"
                            else search_region(index, one, box, k=depth))
                    rankings[i, search].append([int(rows[i][h.id]) for h in hits])
        done += len(batch)
        print(f"  {done}/{len(eval_set.queries)} queries ({done / (time.perf_counter() - started):.1f}/s)", file=sys.stderr)
    return rankings


def _depth(depth: int) -> int:
    """--depth, refused outside 1..MAX_RESULTS: capping it quietly would report a depth that was not searched."""
    try:
        return check_k(depth, MAX_RESULTS)
    except SearchError:
        raise UserError(f"--depth must be between 1 and {MAX_RESULTS}, the most results one search returns "
                        f"(got {depth}).") from None


def _searches(text: str) -> list[str]:
    searches = [s.strip() for s in text.split(",") if s.strip()]
    if not searches or any(s not in SEARCHES for s in searches):
        raise UserError(f"--searches takes image, region or image,region (got {text!r}).")
    return searches


def _factories(index: Index) -> dict[str, str]:
    return {"global": index.manifest.get("global_factory", "?"), "patch": index.manifest.get("patch_factory", "?")}


def format_table(results: list[Result]) -> str:
    """One line per index, search and query set (e.g. medium / hard, or a transform); figures in percent."""
    ks = sorted({k for r in results for s in r.metrics.values() for k in s.precision})
    lines = [["index", "factories", "search", "set", "queries", "mAP"] + [f"P@{k}" for k in ks]]
    for r in results:
        factories = f"{r.factories['global']} / {r.factories['patch']}"
        for name, s in r.metrics.items():
            precision = [f"{100 * s.precision[k]:.1f}" if k in s.precision else "" for k in ks]
            lines.append([r.index, factories, r.search, name, str(s.queries), f"{100 * s.map:.1f}"] + precision)
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())
