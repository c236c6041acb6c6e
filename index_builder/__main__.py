"""`python -m index_builder`: turn a Hugging Face `datasets` collection into an index folder, and keep
it current: `add` new images, `remove` some, `compact` the folder, list near-`duplicates`."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from dino_demo.backbones import DEFAULT_MODEL, KNOWN_MODELS
from dino_demo.config import add_arguments
from dino_demo.errors import UserError

from .build import BuildOptions
from .cli import add_ray_argument, add_source_arguments, connect_ray, print_skipped, progress_bar, run_options

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit
# Commands besides a build (the default): each is a module of this package with build_parser() and run(args).
COMMANDS = {"add": "add", "remove": "remove", "compact": "remove", "duplicates": "duplicates"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m index_builder",
        description="Build a DINO image index folder from a Hugging Face datasets collection. "
        "Rerun the same command after an interruption to resume. Other commands change a finished index: "
        "add, remove, compact, duplicates (`python -m index_builder add --help`).",
    )
    add_source_arguments(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL}; also {', '.join(KNOWN_MODELS[1:])})")
    p.add_argument("--out", required=True, help="index folder to write (resumed if a build there was interrupted)")
    p.add_argument("--rebuild", action="store_true", help="build anew over a finished index in --out (replaced in one "
                   "step when done; its removed images stay out)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--input-size", type=int, help="model input side in pixels (default: the model's)")
    p.add_argument("--push-to-hub", metavar="USER/REPO", help="then upload the index as a dataset repo (serve it with --index hf://USER/REPO)")
    add_ray_argument(p)
    add_arguments(p, BuildOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    module = importlib.import_module(f".{command}", __package__) if command else sys.modules[__name__]
    args = (module.build_parser(argv[0]) if command else build_parser()).parse_args(argv[1:] if command else argv)
    where = getattr(args, "out", None) or getattr(args, "index", None)
    try:
        return module.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume where it stopped in {where}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # Finished chunks are complete on disk (atomic renames); only the one being written is lost.
        print(f"error: {e.strerror} writing {e.filename or where}; free some space and rerun the same "
              "command: it resumes from its last finished chunk, and the index is as it was before.", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from dino_demo.model import Embedder, pick_device

    from .build import build_index
    from .source import open_source

    distributor = None
    if args.ray and args.decode == "gpu":
        raise UserError("With --ray the cluster's CPU workers decode the images (nvJPEG is for a build on this "
                        "machine's GPU): leave out --decode gpu.")
    if args.ray:  # the cluster's actors embed; the model here only describes the index
        distributor, where, device = connect_ray(args.ray)
        args.out = str(Path(args.out).absolute())  # the same folder from every worker (a shared file system)
    else:
        device = pick_device(args.device)
    options = run_options(args, device)
    source = open_source(args.dataset, args.split, args.image_column, args.label_column, args.streaming, args.revision)
    embedder = Embedder(args.model, device="cpu" if args.ray else device, input_size=args.input_size,
                        batch_size=options.batch_size)
    total = source.num_rows if options.limit is None else min(options.limit, source.num_rows or options.limit)
    workers = f"{options.workers} decoding process{'' if options.workers == 1 else 'es'}"
    batch = f"batch {options.batch_size}"
    where = f"{where} ({batch})" if args.ray else f"{embedder.device} ({batch}, {workers})"
    print(f"indexing {args.dataset} [{args.split}] with {args.model} on {where} into {args.out}", file=sys.stderr)
    bar, progress = progress_bar(total, "indexing")
    with bar:
        report = build_index(source, embedder, args.out, options, progress, rebuild=args.rebuild,
                             distributor=distributor)
    if report.complete_before:
        print(f"{args.out} is already a complete index of {args.dataset} ({report.indexed} images): nothing to do. "
              f"New images? `python -m index_builder add --index {args.out} --dataset ...`; start over: --rebuild.",
              file=sys.stderr)
    else:
        rate = (report.rows_this_run / report.seconds) if report.seconds else 0.0
        resumed = f", resumed at row {report.resumed_from}" if report.resumed_from else ""
        print(f"indexed {report.indexed} images into {args.out} in {report.seconds:.1f}s "
              f"({rate:.1f} images/s this run{resumed})", file=sys.stderr)
        print_skipped(report.skipped)
    if args.push_to_hub:
        from .hub_upload import upload_index
        print(f"uploaded to {upload_index(args.out, args.push_to_hub)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
