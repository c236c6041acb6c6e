"""Image search (CLS vectors) at scale: IVF-PQ against an HNSW graph over 8-bit codes, side by side.

    .venv/bin/python benchmarks/scale_global.py --sizes 100000,1000000

Vectors are scale.py's SYNTHETIC clustered CLS vectors (384 dims; not from images; `--structure`
hierarchical or flat concepts, see scale.py). For each size the
exact top 10 of held-out queries comes from brute force; each index is built with the app's
`build_faiss`, written, memory-mapped with the app's `open_faiss_file` and searched one query at a
time (as a request does) for each search setting: p50 / p95 ms, recall@10, build time, file size,
and the memory the process gained by opening and searching it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from scale import CHUNK, DIM, STRUCTURES, Synthetic, recall, rss_mb  # noqa: E402

from dino_demo.index_types import TRAIN_MAX, IndexSpec, _nlist, build_faiss, open_faiss_file  # noqa: E402


def candidates(count: int) -> list[tuple[str, list[str]]]:
    nlist = _nlist(count)
    return [
        (f"IVF{nlist}_HNSW32,PQ48x8,Refine(SQ8)",
         [f"nprobe={nlist // d},quantizer_efSearch={max(64, 2 * nlist // d)},k_factor_rf={kf}"
          for d in (16, 8, 4) for kf in (10, 50)]),
        ("HNSW32,SQ8", [f"efSearch={ef}" for ef in (64, 128, 256, 512, 1024)]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--only", default="", help="run only factories containing this text")
    p.add_argument("--structure", default="hierarchical", help=f"comma-separated, of {', '.join(STRUCTURES)} (see scale.py)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}; {args.threads} threads; synthetic clustered CLS vectors, {DIM} dims", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scale-global-"))
    for count, structure in ((c, s) for c in map(int, args.sizes.split(",")) for s in args.structure.split(",")):
        data = Synthetic(count, structure=structure)
        started = time.perf_counter()
        cls = np.concatenate([data.images(s, min(CHUNK, count - s), with_patches=False)[0]
                              for s in range(0, count, CHUNK)])
        queries = data.images(10**9, args.queries, with_patches=False)[0]
        exact = faiss.IndexFlatIP(DIM)
        exact.add(cls)
        _, truth = exact.search(queries, 10)
        del exact
        print(f"\n{count:,} images, {structure} concepts: vectors and exact top 10 in {time.perf_counter() - started:.0f} s",
              flush=True)
        sample = cls[np.random.default_rng(0).choice(count, min(count, TRAIN_MAX), replace=False)]
        for factory, settings in candidates(count):
            if args.only not in factory:
                continue
            started = time.perf_counter()
            index = build_faiss(IndexSpec(factory, ""), DIM, sample, lambda: (cls[s:s + 65536] for s in range(0, count, 65536)))
            build_s = time.perf_counter() - started
            path = work / "global.faiss"
            faiss.write_index(index, str(path))
            del index
            before = rss_mb()
            index = open_faiss_file(str(path), "")
            opened = rss_mb()
            print(f"  {factory}: build {build_s:.0f} s ({count / build_s:,.0f} vectors/s), file {path.stat().st_size / count:,.0f} B"
                  f" per image, +{opened - before:,.0f} MB on open", flush=True)
            for setting in settings:
                faiss.ParameterSpace().set_index_parameters(index, setting)
                for q in queries[:10]:  # warm the pages the first queries touch
                    index.search(q[None], 10)
                ms, found = [], []
                for q in queries:
                    t = time.perf_counter()
                    _, ids = index.search(q[None], 10)
                    ms.append((time.perf_counter() - t) * 1000)
                    found.append(ids[0].tolist())
                print(f"    {setting:55s} p50 {np.percentile(ms, 50):6.2f} ms  p95 {np.percentile(ms, 95):6.2f} ms"
                      f"  recall@10 {recall(found, truth):.3f}  RSS +{rss_mb() - before:,.0f} MB", flush=True)
            del index
            path.unlink()
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
