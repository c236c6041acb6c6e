"""`python -m index_builder add --index DIR --dataset NEW`: add a dataset's new images to a finished index.

The images are embedded with the index's own model, input size, patch layout and face policy,
and written as a new segment filled into the index's trained quantisers (no retraining). Images
already in the index (an exact copy) or removed from it are skipped and counted, so rerunning an
add, or adding a folder that has grown, adds only what is new.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_demo.config import add_arguments
from dino_demo.index_types import choose_spec

from .build import BuildOptions
from .cli import (RUN_OPTIONS, add_ray_argument, add_source_arguments, connect_ray, index_embedder, print_skipped,
                  progress_bar, run_options)

SEGMENTS_BEFORE_COMPACT = 8  # each segment is searched on its own: beyond this many, suggest merging them
RETRAIN_GROWTH = 2.0  # a quantiser trained on n images serves up to about this many times n


def build_parser(command: str = "add") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m index_builder add",
        description="Add a dataset's images to a finished index with the index's own model and settings. "
        "Images already in it, or removed from it, are skipped. Rerun the same command after an interruption.")
    p.add_argument("--index", required=True, help="the index folder to add to")
    add_source_arguments(p)
    p.add_argument("--model", help="refused unless it is the index's own model (default: the index's)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best there is)")
    add_ray_argument(p)
    add_arguments(p, BuildOptions, only=RUN_OPTIONS)
    return p


def run(args: argparse.Namespace) -> int:
    from dino_demo.index import read_manifest
    from dino_demo.model import pick_device

    from .build import add_to_index
    from .source import open_source

    built = read_manifest(Path(args.index))["model"]
    distributor = None
    if args.ray:  # the cluster's actors embed; the model here only describes the images' vectors
        distributor, where, device = connect_ray(args.ray)
        args.index = str(Path(args.index).absolute())
    else:
        device = pick_device(args.device)
    options = run_options(args, device)
    embedder = index_embedder(args.index, built, args.model, "cpu" if args.ray else device,
                              batch_size=options.batch_size)
    source = open_source(args.dataset, args.split, args.image_column, args.label_column, args.streaming, args.revision)
    total = source.num_rows if options.limit is None else min(options.limit, source.num_rows or options.limit)
    print(f"adding {args.dataset} [{args.split}] to {args.index} with {embedder.model_id} on "
          f"{where if args.ray else embedder.device}", file=sys.stderr)
    bar, progress = progress_bar(total, "adding")
    with bar:
        report = add_to_index(source, embedder, args.index, options, progress, distributor=distributor)
    m = report.manifest
    resumed = f", resumed at row {report.resumed_from}" if report.resumed_from else ""
    print(f"added {report.indexed} images to {args.index} in {report.seconds:.1f}s{resumed}; it now holds "
          f"{m['count']} images in {len(m['segments'])} segment{'s' if len(m['segments']) > 1 else ''}",
          file=sys.stderr)
    print_skipped(report.skipped)
    if advice := compact_advice(m):
        print(advice, file=sys.stderr)
    return 0


def compact_advice(manifest: dict) -> str | None:
    """When a rewrite starts to pay: many segments, or a collection that outgrew its index type or the
    sample its quantisers were trained on (README, "Keeping an index current")."""
    stored, dim = manifest["stored"], manifest["model"]["dim"]
    reasons = []
    if len(manifest["segments"]) > SEGMENTS_BEFORE_COMPACT:
        reasons.append(f"it has {len(manifest['segments'])} segments, each searched on its own")
    index_type = manifest.get("index_type", "auto")
    if choose_spec(stored, dim, "global", index_type).factory != manifest["global_factory"]:
        reasons.append(f"{stored} images are past what {manifest['global_factory']} was chosen for")
    elif manifest["global_factory"] != "Flat" and stored > RETRAIN_GROWTH * manifest.get("trained_on", stored):
        reasons.append(f"its quantisers were trained on {manifest['trained_on']} images, and it holds {stored}")
    if not reasons:
        return None
    return (f"note: {' and '.join(reasons)}; `python -m index_builder compact --index FOLDER` rewrites it "
            "(ids are kept) with indexes chosen and trained for its size now.")
