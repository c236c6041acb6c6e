"""What the face gate costs per photo, upright only and with turned photos checked too.

`python benchmarks/face_gate.py [--folder assets/collection] [--repeat 3]` prints ms per image (mean and
p50, one process, one thread) for the shipped photos (no faces: every turn is tried) and for a photo of
a person turned a quarter (found on the second view).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_checks(gate, images, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        for image in images:
            started = time.perf_counter()
            gate.check(image)
            times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    import torch  # only to pin the thread count the way the app runs on one core
    from matplotlib import cbook
    from PIL import Image

    from dino_demo.faces import ALL_TURNS, UPRIGHT, FaceGate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=ROOT / "assets" / "collection")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    photos = [Image.open(f).convert("RGB") for f in sorted(args.folder.glob("*.jpg"))]
    face = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    print(f"{platform.processor() or platform.machine()}, {len(photos)} photos of "
          f"{statistics.median(p.width for p in photos)}x{statistics.median(p.height for p in photos)} px (median)")
    for name, turns in (("upright only", UPRIGHT), ("all four turns", ALL_TURNS)):
        gate = FaceGate(turns=turns)
        gate.check(photos[0])  # load MediaPipe outside the timing
        times = time_checks(gate, photos, args.repeat)
        turned = time_checks(gate, [face], args.repeat)
        print(f"{name:15s} face-free photo: mean {statistics.mean(times):6.1f} ms, p50 {statistics.median(times):6.1f} ms"
              f" | turned portrait: p50 {statistics.median(turned):6.1f} ms, refused: {gate.check(face).has_face}")


if __name__ == "__main__":
    main()
