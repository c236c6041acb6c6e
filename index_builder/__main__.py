"""`python -m index_builder`: turn a Hugging Face `datasets` collection into an index folder."""
from __future__ import annotations

import argparse
import errno
import sys
from dataclasses import fields

from dino_demo.backbones import DEFAULT_MODEL, KNOWN_MODELS
from dino_demo.config import add_arguments
from dino_demo.errors import UserError

from .build import BuildOptions

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m index_builder",
        description="Build a DINO image index folder from a Hugging Face datasets collection. "
        "Rerun the same command after an interruption to resume.",
    )
    p.add_argument("--dataset", required=True, help="hub id ORG/NAME, a local image or parquet folder, or a .parquet file")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--image-column", help="column holding the images (default: the first image column)")
    p.add_argument("--label-column", help="column with a label or caption to show (default: label/caption if present)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL}; also {', '.join(KNOWN_MODELS[1:])})")
    p.add_argument("--out", required=True, help="index folder to write (resumed if a build there was interrupted)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--input-size", type=int, help="model input side in pixels (default: the model's)")
    p.add_argument("--streaming", action="store_true", help="read the dataset as a stream instead of downloading it first")
    p.add_argument("--push-to-hub", metavar="USER/REPO", help="then upload the index as a dataset repo (serve it with --index hf://USER/REPO)")
    add_arguments(p, BuildOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume the build in {args.out}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # Finished chunks are complete on disk (atomic renames); only the one being written is lost.
        print(f"error: {e.strerror} writing {e.filename or args.out}; free some space and rerun the same "
              "command: the build resumes from its last finished chunk.", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dino_demo.model import Embedder, pick_device

    from .build import build_index, default_batch_size
    from .source import open_source

    device = pick_device(args.device)
    given = {f.name: getattr(args, f.name) for f in fields(BuildOptions) if getattr(args, f.name) is not None}
    options = BuildOptions(**{"batch_size": default_batch_size(device), **given})
    batch_size = options.batch_size
    source = open_source(args.dataset, args.split, args.image_column, args.label_column, args.streaming)
    embedder = Embedder(args.model, device=device, input_size=args.input_size, batch_size=batch_size)
    limit = options.limit
    total = source.num_rows if limit is None else min(limit, source.num_rows or limit)
    workers = f"{options.workers} decoding process{'' if options.workers == 1 else 'es'}"
    print(f"indexing {args.dataset} [{args.split}] with {args.model} on {embedder.device} (batch {batch_size}, "
          f"{workers}) into {args.out}", file=sys.stderr)
    skipped = {}
    with tqdm(total=total, unit="img", desc="indexing", dynamic_ncols=True) as bar:
        def progress(decoded) -> None:
            if bar.n == 0 and decoded.first_row > 0:  # resumed: start where earlier runs stopped
                bar.n = bar.last_print_n = decoded.first_row
            for reason, n in decoded.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            bar.update(decoded.last_row + 1 - bar.n)
            if skipped:
                bar.set_postfix(skipped=sum(skipped.values()))

        report = build_index(source, embedder, args.out, options, progress)
    rate = (report.rows_this_run / report.seconds) if report.seconds else 0.0
    resumed = f", resumed at row {report.resumed_from}" if report.resumed_from else ""
    print(f"indexed {report.indexed} images into {args.out} in {report.seconds:.1f}s "
          f"({rate:.1f} images/s this run{resumed})", file=sys.stderr)
    if report.skipped:
        print("skipped: " + ", ".join(f"{n} {r}" for r, n in report.skipped.most_common()), file=sys.stderr)
    if args.push_to_hub:
        from .hub_upload import upload_index
        print(f"uploaded to {upload_index(args.out, args.push_to_hub)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
