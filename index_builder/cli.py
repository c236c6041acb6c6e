"""What the builder's commands share: where images come from, how a run goes, its progress bar."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .build import BuildOptions

RUN_OPTIONS = ("batch_size", "workers", "chunk_size", "limit", "max_pixels")  # how an add runs; the rest is the index's


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where images come from: the same options for a build and an add."""
    p.add_argument("--dataset", required=True, help="hub id ORG/NAME, a local image or parquet folder, or a .parquet file")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--revision", help="hub dataset revision: a branch, tag or commit (default: the latest)")
    p.add_argument("--image-column", help="column holding the images (default: the first image column)")
    p.add_argument("--label-column", help="column with a label or caption to show (default: label/caption if present)")
    p.add_argument("--streaming", action="store_true", help="read the dataset as a stream instead of downloading it first")


def add_ray_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run on a Ray cluster: auto (the one this machine belongs to, "
                   "else a new one here) or the head's address; workers read, decode and embed shards in parallel "
                   "(README, Building on a Ray cluster)")


def connect_ray(address: str):
    """The Ray distributor, connected, with a line saying what it runs on and the device its actors use."""
    from .ray_build import RayDistributor, connect

    resources = connect(address)
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    models = "a model per GPU" if gpus else "a model per machine on its CPUs"
    where = f"a Ray cluster of {cpus} CPUs and {gpus} GPUs, {models}"
    return RayDistributor(), where, "cuda" if gpus else "cpu"


def index_embedder(index: str | Path, built: dict, model: str | None, device: str, **options):
    """The model an index was `built` with (its manifest's "model"), or the local copy of it given as
    `model`, at the index's input size; another model is refused before it loads."""
    from dino_demo.backbones import short_name
    from dino_demo.errors import UserError
    from dino_demo.model import Embedder

    if model is not None and short_name(model) != short_name(built["id"]):
        raise UserError(f"The index at {index} was built with {built['id']}, and this command must use the same "
                        f"model: leave out --model, or pass a local copy of {built['id']}.")
    return Embedder.for_index(built, model, built["input_size"], device=device, **options)


def run_options(args: argparse.Namespace, device: str) -> BuildOptions:
    """BuildOptions from the options given, with the device's batch size unless one was given."""
    from .build import default_batch_size

    given = {f.name: getattr(args, f.name) for f in fields(BuildOptions) if getattr(args, f.name, None) is not None}
    return BuildOptions(**{"batch_size": default_batch_size(device), **given})


def progress_bar(total: int | None, desc: str):
    """A tqdm bar and the callback that moves it by the rows of each batch or chunk done, in any order
    (a resumed run's first call counts the rows earlier runs finished)."""
    from tqdm import tqdm

    bar, skipped = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True), {}

    def progress(decoded) -> None:
        for reason, n in decoded.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        bar.update(decoded.last_row + 1 - decoded.first_row)
        if skipped:
            bar.set_postfix(skipped=sum(skipped.values()))

    return bar, progress


def print_skipped(skipped) -> None:
    if skipped:
        print("skipped: " + ", ".join(f"{n} {r}" for r, n in skipped.most_common()), file=sys.stderr)
