"""Print embedder and index-build throughput for ViT-S/16 at 224 px (random weights of the real size).

    python benchmarks/embed.py [--device cpu|cuda] [--images 256] [--workers N]

Figures: model-only images/s per batch size (fp32, and bf16 on GPU); JPEG decode + resize
images/s with the builder's worker processes; and the whole builder (decode -> embed -> write)
against the slower of those two limits.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)



def write_jpegs(folder: Path, count: int) -> Path:
    """`count` 640x480 photo-like JPEGs (smooth noise), about the size of a dataset image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def time_model(embedder, batch: int, seconds: float) -> float:
    pixels = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    sizes = [(224, 224)] * batch
    embedder.embed_prepared(pixels, sizes)  # warm-up
    if embedder.device == "cuda":
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed_prepared(pixels, sizes)
        done += batch
    if embedder.device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def time_decode(folder: Path, workers: int, skip_faces: bool = False) -> float:
    from dino_demo.faces import FaceGate
    from dino_demo.images import DEFAULT_MAX_PIXELS
    from index_builder.build import Decoder, _batches, _decoded
    from index_builder.source import open_source

    source = open_source(str(folder))
    decoder = Decoder(224, 0, DEFAULT_MAX_PIXELS, FaceGate if skip_faces else None)
    started = time.perf_counter()
    count = sum(len(d.meta) for d in _decoded(_batches(source.rows(), 64), decoder, workers))
    return count / (time.perf_counter() - started)


def time_build(folder: Path, embedder, workers: int, batch: int) -> float:
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    with tempfile.TemporaryDirectory() as out:
        report = build_index(open_source(str(folder)), embedder, out,
                             BuildOptions(batch_size=batch, workers=workers, skip_faces=False, thumb_size=0))
    return report.indexed / report.seconds


def main() -> None:
    from dino_demo.model import Embedder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=256, help="images for the decode and build runs")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seconds", type=float, default=10.0, help="time per model measurement")
    p.add_argument("--batches", default="1,32", help="model batch sizes to time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_vits16(Path(tmp) / "vits16")
        images = write_jpegs(Path(tmp) / "images", args.images)
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        dtypes = [False, True] if Embedder(str(model_dir), device=args.device).device == "cuda" else [False]
        model_rates = []
        for bf16 in dtypes:
            embedder = Embedder(str(model_dir), device=args.device, bf16=bf16)
            for batch in (int(b) for b in args.batches.split(",")):
                rate = time_model(embedder, batch, args.seconds)
                model_rates.append(rate)
                print(f"model  {embedder.device:5s} {'bf16' if bf16 else 'fp32'} batch {batch:4d}: "
                      f"{rate:9.1f} images/s  ({1000 / rate:.1f} ms/image)")
        decode = time_decode(images, args.workers)
        print(f"decode+resize, {args.workers} workers: {decode:9.1f} images/s")
        gated = time_decode(images, args.workers, skip_faces=True)
        print(f"decode+resize+face gate, {args.workers} workers: {gated:9.1f} images/s")
        batch = max(int(b) for b in args.batches.split(","))
        build = time_build(images, embedder, args.workers, batch)
        limit = min(max(model_rates), decode)
        print(f"build (decode -> embed -> write), batch {batch}: {build:9.1f} images/s = "
              f"{100 * build / limit:.0f}% of the slower limit ({limit:.1f})")


if __name__ == "__main__":
    main()
