"""What a phone-sized photo costs the app before any search: decoding, the face gate and the embedding.

The shipped photos are 512 px wide; a phone's are 4,000 px or more. This enlarges a shipped photo (16:10) to
each `--widths` (with grain, so the JPEG has a phone's size), and times, as the app's engine runs
them on 2 cores: `load_image` (decode), the face gate (`FaceGate(workers=2)`, its four turns side by
side; its `gate_view` step alone as well), `prepare_image` (the resize to the model's input) and the
model itself (ViT-S/16-sized, random weights, ONNX int8 as the app runs it), and their sum: what an
upload's preparation takes. p50 of `--repeat` runs, in ms.

    python benchmarks/large_photo.py [--widths 512,1024,2048,4032,5712] [--repeat 5]
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)

PHOTO = ROOT / "assets" / "collection" / "mate-red-marigold.jpg"


def phone_photo(side: int, seed: int = 0, source: Path = PHOTO) -> bytes:
    """A JPEG (quality 90) of a shipped photo enlarged to `side` px on its longer side, with a sensor's grain."""
    from PIL import Image

    photo = Image.open(source).convert("RGB")
    scale = side / max(photo.size)
    size = (round(photo.width * scale), round(photo.height * scale))
    photo = photo.resize(size, Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed).integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
    photo = Image.fromarray(np.clip(np.asarray(photo, np.int16) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    photo.save(out, format="JPEG", quality=90)
    return out.getvalue()


def p50(step, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def main() -> None:
    import torch

    from dino_demo.faces import FaceGate, gate_view
    from dino_demo.images import load_image
    from dino_demo.model import Embedder, prepare_image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="512,1024,2048,4032,5712")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        embedder = Embedder(str(save_vits16(Path(tmp) / "vits16")), device="cpu", backend="auto",
                            cache_dir=Path(tmp) / "cache", batch_size=1)
        gate = FaceGate(workers=2)

        def prepare(data: bytes) -> None:  # as Engine._prepare does for an upload
            image = load_image(data)
            gate.require_no_face(image)
            embedder.embed([image])

        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"embedder on {embedder.backend}, face gate with 2 workers; p50 of {args.repeat}, ms")
        steps = ("decode", "gate_view", "face gate", "resize", "model", "prepared")
        print(f"{'photo':<20}{'JPEG MB':>8}" + "".join(f"{s:>11}" for s in steps))
        for width in (int(w) for w in args.widths.split(",")):
            data = phone_photo(width)
            image = load_image(data)
            gate.check(image)  # warm-up: the workers' detectors are made on first use
            pixels = np.stack([prepare_image(image, embedder.input_size)])
            figures = [p50(lambda: load_image(data), args.repeat),
                       p50(lambda: gate_view(image), args.repeat),
                       p50(lambda: gate.check(image), args.repeat),
                       p50(lambda: prepare_image(image, embedder.input_size), args.repeat),
                       p50(lambda: embedder.embed_prepared(pixels, [image.size]), args.repeat),
                       p50(lambda: prepare(data), args.repeat)]
            print(f"{f'{image.width} x {image.height}':<20}{len(data) / 1e6:>8.1f}"
                  + "".join(f"{f:>11.1f}" for f in figures))
        gate.close()


if __name__ == "__main__":
    main()
