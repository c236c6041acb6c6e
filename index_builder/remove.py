"""`python -m index_builder remove --index DIR --ids 3,17 | --source-rows 3,5 | --where label=cat`, and
`python -m index_builder compact --index DIR`.

A removal takes images out of every search at once (image search, region search, "search from
this result", thumbnails) by tombstoning their ids; ids are never reused. `compact` then rewrites
the folder without them, retraining the FAISS indexes for the collection's size; ids are kept.
"""
from __future__ import annotations

import argparse
import sys


def build_parser(command: str = "remove") -> argparse.ArgumentParser:
    if command == "compact":
        p = argparse.ArgumentParser(
            prog="python -m index_builder compact",
            description="Rewrite an index folder as one segment without its removed images, with FAISS indexes "
            "chosen and trained for its size now (ids are kept). Rerun after an interruption to resume.")
        p.add_argument("--index", required=True, help="the index folder to compact")
        return p
    p = argparse.ArgumentParser(
        prog="python -m index_builder remove",
        description="Take images out of an index at once; a running app stops showing them within seconds. "
        "Their ids are never reused, and adding the same pictures again is refused. "
        "`compact` afterwards drops their vectors and thumbnails from the folder.")
    p.add_argument("--index", required=True, help="the index folder to remove images from")
    p.add_argument("--ids", type=_numbers, default=[], help="image ids, as the app and the API show them: 3,17")
    p.add_argument("--source-rows", type=_numbers, default=[], help="rows of the dataset the images came from: 3,5")
    p.add_argument("--dataset", help="with --source-rows: which of the index's datasets (default: the one it was built "
                   "from); its path or hub id as given to the build or add")
    p.add_argument("--where", type=_condition, help="every image whose column has this value: label=cat "
                   "(columns: label, source_row, source, hash, width, height)")
    return p


def run(args: argparse.Namespace) -> int:
    from dino_demo.index import load_index
    from dino_demo.index_update import compact, few, remove_images, select_ids

    if not hasattr(args, "ids"):
        return _compact(args, compact)
    index = load_index(args.index)
    if not (args.ids or args.source_rows or args.where):
        print("error: say which images: --ids, --source-rows or --where", file=sys.stderr)
        return 2
    source = _source_number(index.manifest, args.dataset)
    ids = select_ids(index, args.ids, args.source_rows, source, args.where)
    done = remove_images(args.index, ids, _reason(args))
    if done.already:
        print(f"already removed: {few(done.already, 20)}", file=sys.stderr)
    print(f"removed {len(done.removed)} image{'s' if len(done.removed) != 1 else ''} from {args.index} "
          f"({few(done.removed, 20) or 'none'}); it now holds {done.manifest['count']} images. A running app stops "
          "showing them within seconds; `compact` drops them from the folder.", file=sys.stderr)
    return 0


def _compact(args, compact) -> int:
    from tqdm import tqdm

    with tqdm(unit="img", desc="compacting", dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        manifest = compact(args.index, progress)
    print(f"compacted {args.index}: {manifest['count']} images in one segment "
          f"({manifest['global_factory']} / {manifest['patch_factory']}); ids are unchanged", file=sys.stderr)
    return 0


def _source_number(manifest: dict, dataset: str | None) -> int:
    """The place in the manifest's sources of `dataset` (as a path or hub id), 0 without one."""
    from pathlib import Path

    from dino_demo.errors import UserError

    if dataset is None:
        return 0
    local = Path(dataset).expanduser()
    wanted = str(local.resolve()) if local.exists() else dataset
    names = [s.get("dataset") for s in manifest.get("sources", [])]
    if wanted not in names:
        raise UserError(f"The index holds no images of {dataset}; its datasets are {', '.join(map(str, names))}.")
    return names.index(wanted)


def _reason(args) -> str:
    parts = [f"ids {','.join(map(str, args.ids))}" if args.ids else "",
             f"source rows {','.join(map(str, args.source_rows))}" if args.source_rows else "",
             f"{args.where[0]}={args.where[1]}" if args.where else ""]
    return "; ".join(p for p in parts if p)


def _numbers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers like 3,17") from None


def _condition(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=VALUE, like label=cat")
    return column.strip(), value
