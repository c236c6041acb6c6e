"""`python -m index_builder`: turn a Hugging Face `datasets` collection into an index folder."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from dino_demo.errors import UserError
from dino_demo.model import DEFAULT_MODEL, KNOWN_MODELS

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit


def default_workers() -> int:
    """Decoding and the face gate are the CPU's share of a build and, on a GPU box, its limit: every
    core but the one feeding the model."""
    return max(1, (os.cpu_count() or 2) - 1)


def default_batch_size(device: str) -> int:
    """Large batches keep a GPU busy (ViT-S/16 runs thousands of images/s there); on a CPU batching
    gains nothing and the library's smaller default keeps memory and progress steps small."""
    from .build import BuildOptions

    return 256 if device == "cuda" else BuildOptions.batch_size


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
    p.add_argument("--limit", type=int, help="index at most the first N rows")
    p.add_argument("--batch-size", type=int, help="images per model batch (default 256 on a GPU, 64 elsewhere)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the best there is)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="image-decoding processes (default: one per core but one; 0: decode in the main process)")
    p.add_argument("--streaming", action="store_true", help="read the dataset as a stream instead of downloading it first")
    p.add_argument("--skip-faces", action=argparse.BooleanOptionalAction, default=True, help="leave out photos of people (default: on)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (default 1024)")
    p.add_argument("--thumb-size", type=int, default=256, help="longer side of stored thumbnails in pixels (default 256)")
    p.add_argument("--input-size", type=int, help="model input side in pixels (default: the model's)")
    p.add_argument("--patches", default="auto", help="patch vectors kept per image for region search: all, pooled (2x2), "
                   "salient[:N] (the N most CLS-like, default 16), or auto: all up to 20,000 images, else pooled")
    p.add_argument("--index-type", default="auto", choices=("auto", "flat", "compressed"),
                   help="auto: exact search for small collections, HNSW (images) and IVF-PQ (patches) beyond (see README, Scale); or force one")
    p.add_argument("--push-to-hub", metavar="USER/REPO", help="then upload the index as a dataset repo (serve it with --index hf://USER/REPO)")
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

    from .build import BuildOptions, build_index
    from .source import open_source

    device = pick_device(args.device)
    batch_size = args.batch_size or default_batch_size(device)
    options = BuildOptions(
        batch_size=batch_size, workers=args.workers, chunk_size=args.chunk_size,
        thumb_size=args.thumb_size, skip_faces=args.skip_faces, limit=args.limit,
        patches=args.patches, index_type=args.index_type,
    )
    source = open_source(args.dataset, args.split, args.image_column, args.label_column, args.streaming)
    embedder = Embedder(args.model, device=device, input_size=args.input_size, batch_size=batch_size)
    total = source.num_rows if args.limit is None else min(args.limit, source.num_rows or args.limit)
    print(f"indexing {args.dataset} [{args.split}] with {args.model} on {embedder.device} (batch {batch_size}, "
          f"{args.workers} decoding processes) into {args.out}", file=sys.stderr)
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
