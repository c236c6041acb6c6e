"""Print images/s of a Ray build (`--ray`) against the single-machine builder, same machine and collection.

    python benchmarks/ray_build.py [--images 600] [--repeats 3] [--faces] [--address auto]

ViT-S/16 at 224 px with random weights of the real size, generated 640x480 JPEGs. The builders run in
pairs (local, then Ray), so a change in the machine's load falls on both of a pair; each figure is the
wall time of `build_index` (the Ray one includes starting its actors and loading the model in them;
starting Ray itself is printed apart, as a cluster is started once for many builds).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from embed import write_jpegs  # noqa: E402  (benchmarks/ is on the path when run as a script)
from vits16 import save_vits16  # noqa: E402


@dataclass
class Timed:
    whole: float  # images/s over the whole build
    start: float  # seconds until the first rows were done (starting workers, loading the model in them)
    steady: float  # images/s after that


def time_build(images: Path, embedder, out: Path, options, distributor=None) -> Timed:
    """One build of `images` into the new folder `out`, wall time (no image is skipped here)."""
    from index_builder.build import build_index
    from index_builder.source import open_source

    first: list[tuple[float, int]] = []

    def progress(done) -> None:
        if not first:
            first.append((time.perf_counter(), done.last_row + 1 - done.first_row))

    started = time.perf_counter()
    report = build_index(open_source(str(images)), embedder, str(out), options, progress, distributor=distributor)
    ended = time.perf_counter()
    (at, rows), = first
    return Timed(report.indexed / (ended - started), at - started, (report.indexed - rows) / (ended - at))


def same_index(a: Path, b: Path) -> bool:
    """Same ids and metadata, vectors within float noise: the check the tests make, on this run's folders."""
    from dino_demo.index import load_index

    one, two = load_index(a), load_index(b)
    return one.meta.equals(two.meta) and np.allclose(one.vectors(), two.vectors(), atol=1e-4)


def main() -> None:
    import ray
    import torch

    from dino_demo.model import Embedder
    from index_builder.build import BuildOptions, default_workers
    from index_builder.ray_build import RayDistributor, connect

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3, help="pairs of builds (local then Ray)")
    p.add_argument("--faces", action="store_true", help="with the face gate (upright faces only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--address", default="auto", help="Ray cluster (default: a new local one on this machine)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_vits16(Path(tmp) / "vits16")
        images = write_jpegs(Path(tmp) / "images", args.images)
        embedder = Embedder(str(model_dir), device="cpu", batch_size=args.batch_size)
        options = BuildOptions(batch_size=args.batch_size, workers=default_workers(), skip_faces=args.faces,
                               turned_faces=False, thumb_size=0)
        started = time.perf_counter()
        resources = connect(args.address)
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}; "
              f"{args.images} images, batch {args.batch_size}, face gate {'on' if args.faces else 'off'}, "
              f"{options.workers} local decoding processes; Ray: {int(resources.get('CPU', 0))} CPUs, "
              f"{int(resources.get('GPU', 0))} GPUs, started in {time.perf_counter() - started:.1f} s")
        whole, steady = [], []
        for run in range(args.repeats):  # a pair at a time: the load of the moment falls on both of a pair
            local = time_build(images, embedder, Path(tmp) / f"local-{run}", options)
            distributed = time_build(images, embedder, Path(tmp) / f"ray-{run}", options, RayDistributor())
            whole.append(100 * (1 - distributed.whole / local.whole))
            steady.append(100 * (1 - distributed.steady / local.steady))
            print(f"pair {run + 1} (load average {os.getloadavg()[0]:.1f}): whole build local {local.whole:6.2f}, "
                  f"Ray {distributed.whole:6.2f} images/s (overhead {whole[-1]:5.1f}%); first rows after "
                  f"{local.start:5.1f} / {distributed.start:5.1f} s; after them local {local.steady:6.2f}, Ray "
                  f"{distributed.steady:6.2f} images/s (overhead {steady[-1]:5.1f}%)", flush=True)
        print(f"median Ray overhead: whole build {np.median(whole):.1f}%, after the start {np.median(steady):.1f}% "
              f"(goal: under 15%); same index as the local build: "
              f"{same_index(Path(tmp) / 'local-0', Path(tmp) / 'ray-0')}")
        ray.shutdown()


if __name__ == "__main__":
    main()
