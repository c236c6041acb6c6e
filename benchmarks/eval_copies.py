"""Print copy-detection mAP of an exact and a compressed index of the same collection.

    python benchmarks/eval_copies.py [--model ID|DIR] [--distractors 465] [--device cpu]

The collection: the photos of assets/collection (the originals) and generated 640x480
distractors. Both indexes are built with `python -m index_builder` (`--index-type flat` and
`compressed`), then `python -m evaluation --protocol copies` copies every original with
each transform and searches both. The default model is the random-weight ViT-S/16 of
benchmarks/vits16.py (runs offline): its figures show what compression changes, not what DINO
achieves; pass `--model facebook/dino-vits16` for that.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embed import write_jpegs  # noqa: E402  (benchmarks/ is on the path when run as a script)
from vits16 import save_vits16  # noqa: E402


def make_collection(folder: Path, distractors: int) -> int:
    """Originals first (file names sort before the distractors'), so they are the first rows."""
    originals = sorted((ROOT / "assets" / "collection").glob("*.jpg"))
    folder.mkdir(parents=True)
    for photo in originals:
        shutil.copy(photo, folder / f"a-{photo.name}")
    write_jpegs(folder / "tmp", distractors)
    for jpeg in (folder / "tmp").glob("*.jpg"):
        jpeg.rename(folder / f"z-{jpeg.name}")
    (folder / "tmp").rmdir()
    return len(originals)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="hub id or folder (default: random-weight ViT-S/16)")
    p.add_argument("--distractors", type=int, default=465, help="generated distractor images (default 465)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval-copies.json", help="JSON figures (default eval-copies.json)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(save_vits16(tmp / "vits16"))
        originals = make_collection(tmp / "collection", args.distractors)
        indexes = []
        for kind in ("flat", "compressed"):
            out = tmp / f"index-{kind}"
            subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(tmp / "collection"), "--out", str(out),
                            "--model", model, "--device", args.device, "--no-skip-faces", "--index-type", kind],
                           cwd=ROOT, check=True)
            indexes.append(str(out))
        print(f"{originals} originals, {args.distractors} distractors, model {args.model or 'random ViT-S/16'}", flush=True)
        return subprocess.run([sys.executable, "-m", "evaluation", "--index", *indexes, "--queries",
                               str(tmp / "collection"), "--protocol", "copies", "--synthetic", str(originals),
                               "--device", args.device, "--out", str(Path(args.out).resolve())], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
