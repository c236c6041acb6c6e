"""Scale benchmark: build, memory, disk, latency and recall of the index types at 10k / 100k / 1M images.

Vectors are SYNTHETIC, not from real images: 384 dims (ViT-S) and a 14x14 grid, clustered — each
image is a background and an object (a 2-5 x 2-5 cell rectangle) drawn from count/20 shared concepts
(hierarchical by default: in count/1000 groups; see Synthetic), each jittered per image, its patches
noisy copies of them. The CLS vector leans towards the object (0.6 object, 0.4 background), as
DINO's CLS attention does on real photos; `salient` then keeps mostly object patches — on real data
that is an assumption. The index is built through the real `index.Writer` and searched through the
real `search_image` / `search_region`; region recall@10 is against exact brute-force search over
every patch, and over the slots the layout stores.

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000 --patches all,pooled,salient

With `--work DIR --keep` the built folder (and the exact truth) stays in DIR and a later run with the
same size, layout and index type reuses it, so search settings can be swept without rebuilding:

    .venv/bin/python benchmarks/scale.py --sizes 1000000 --patches all --direct-patches --work /tmp/scale --keep \
        --region-sweep "nprobe=512,per_patch=256,candidates=200;nprobe=128,per_patch=64,candidates=50"
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dino_demo.index import load_index  # noqa: E402
from dino_demo.index_writer import Writer  # noqa: E402
from dino_demo.index_types import choose_layout  # noqa: E402
from dino_demo.model import Features  # noqa: E402
from dino_demo.patch_select import PatchLayout, reduce_patches  # noqa: E402
from dino_demo.geometry import Box, patches_in  # noqa: E402
from dino_demo.search import search_image, search_region  # noqa: E402

DIM, GRID, CHUNK = 384, (14, 14), 1024
SIZE = (224, 224)  # every synthetic image: one pixel box per 16 px patch


STRUCTURES = ("hierarchical", "flat")


class Synthetic:
    """Deterministic clustered images: chunk `c` is the same on every call.

    `flat`: the count/20 concepts are independent random directions, so an image's only neighbours
    are the ~20 sharing its object concept and everything else is at similarity ~0: a needle in a
    haystack, with nothing to lead a graph or an inverted file towards it as the count grows.
    `hierarchical`: the concepts fall into count/1000 groups (each concept its group's direction
    plus as much of its own; 1,000 groups at 1M, like ImageNet's classes and their fine-grained
    kinds), so similarity falls off by degrees, as it does between real photos' features.
    """

    def __init__(self, count: int, seed: int = 0, grid=GRID, structure: str = "hierarchical"):
        rng = np.random.default_rng(seed)
        self.grid, self.seed = grid, seed
        self.concepts = _unit(rng.standard_normal((max(50, count // 20), DIM), dtype=np.float32))
        self.noise = rng.standard_normal((1 << 16, DIM), dtype=np.float32) / np.sqrt(DIM)
        if structure == "hierarchical":
            groups = np.random.default_rng([seed, 1]).standard_normal((max(5, len(self.concepts) // 50), DIM))
            group_of = np.arange(len(self.concepts)) % len(groups)
            self.concepts = _unit(_unit(groups.astype(np.float32))[group_of] + self.concepts)
        elif structure != "flat":
            raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")

    def images(self, start: int, n: int, with_patches: bool = True):
        """cls (n, d), patches (n, cells, d), object boxes (n, 4) in grid cells. Without patches, the
        same CLS vectors (the same random draws) at a fraction of the cost, and patches None."""
        rng = np.random.default_rng([self.seed, start])
        gh, gw = self.grid
        own = lambda k: self.noise[rng.integers(0, len(self.noise), k)]  # noqa: E731
        back = self.concepts[rng.integers(0, len(self.concepts), n)] + 0.7 * own(n)
        obj = self.concepts[rng.integers(0, len(self.concepts), n)] + 0.7 * own(n)
        r0, c0 = rng.integers(0, gh - 2, n), rng.integers(0, gw - 2, n)
        r1, c1 = np.minimum(gh, r0 + rng.integers(2, 6, n)), np.minimum(gw, c0 + rng.integers(2, 6, n))
        rows, cols = np.divmod(np.arange(gh * gw), gw)
        inside = (rows >= r0[:, None]) & (rows < r1[:, None]) & (cols >= c0[:, None]) & (cols < c1[:, None])
        if with_patches:
            patches = np.where(inside[..., None], obj[:, None], back[:, None])
            patches = _unit(patches + 0.8 * own(n * gh * gw).reshape(n, gh * gw, DIM))
        else:
            rng.integers(0, len(self.noise), n * gh * gw)  # the draws own() would make, to keep CLS the same
            patches = None
        cls = _unit(0.4 * back + 0.6 * obj + 0.3 * own(n))
        return cls, patches, np.stack([c0, r0, c1, r1], axis=1)


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def build(out: Path, data: Synthetic, count: int, patches: str, index_type: str) -> float:
    model = {"id": "synthetic-vits16", "revision": None, "type": "vit", "input_size": 224,
             "patch_size": 16, "dim": DIM, "grid": list(data.grid)}
    writer = Writer(out, {"model": model, "source": {}, "skip_faces": False, "thumb_size": 0,
                          "patches": choose_layout(patches, count).describe()})
    started = time.perf_counter()
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        cls, vectors, _ = data.images(start, n)
        meta = [{"source_row": start + i, "width": SIZE[0], "height": SIZE[1]} for i in range(n)]
        writer.add_chunk(start, start + n, cls, vectors, meta, Counter())
    writer.finalize({}, index_type)
    return time.perf_counter() - started


def exact_truth(data: Synthetic, count: int, global_q: np.ndarray, region_q: list[np.ndarray], layout: PatchLayout,
                k: int = 10):
    """Top-k ids by exact search: CLS inner product; region score (mean over query patches of the best
    match in an image) over every patch, and over the slots `layout` stores (all float32)."""
    g_scores, all_scores, kept_scores = [], [], []
    stacked = np.concatenate(region_q)
    bounds = np.cumsum([0] + [len(q) for q in region_q])

    def region_scores(vectors):  # (n, slots, d) -> (n, queries)
        best = (vectors.reshape(-1, DIM) @ stacked.T).reshape(len(vectors), -1, len(stacked)).max(axis=1)
        return np.stack([best[:, a:b].mean(axis=1) for a, b in zip(bounds, bounds[1:])], axis=1)

    for start in range(0, count, CHUNK):
        cls, patches, _ = data.images(start, min(CHUNK, count - start))
        g_scores.append(cls @ global_q.T)
        all_scores.append(region_scores(patches))
        kept_scores.append(region_scores(reduce_patches(layout, cls, patches, data.grid)[0]))
    top = lambda s: np.argsort(-np.concatenate(s), axis=0)[:k].T  # noqa: E731
    return top(g_scores), top(all_scores), top(kept_scores)


def queries(data: Synthetic, n_global: int, n_region: int):
    """Held-out images (ids past any indexed size): global CLS queries and object-box region queries."""
    cls, patches, boxes = data.images(10**9, max(n_global, n_region))
    cell = SIZE[0] / data.grid[1]
    region = []
    for i in range(n_region):
        box = tuple(float(v) * cell for v in boxes[i])
        region.append((Features(cls[i:i + 1], patches[i:i + 1], data.grid, [SIZE]), box))
    return cls[:n_global], region


def timed(fn, items) -> tuple[list, np.ndarray]:
    results, ms = [], []
    for item in items:
        t = time.perf_counter()
        results.append(fn(item))
        ms.append((time.perf_counter() - t) * 1000)
    return results, np.array(ms)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def rss_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def cached_truth(out: Path, keep: bool, queries: tuple[int, int], compute) -> tuple:
    """The exact truth, computed once per kept folder and query counts (it scans every vector: minutes at 1M)."""
    file = out / f"truth-{queries[0]}-{queries[1]}.npz"
    if keep and file.is_file():
        saved = np.load(file)
        return saved["image"], saved["region"], saved["kept"]
    truth = compute()
    if keep:
        np.savez(file, image=truth[0], region=truth[1], kept=truth[2])
    return truth


def sweep(index, r_q, kept_truth, settings: str) -> None:
    """Region search under other search settings: `nprobe=..,per_patch=..,candidates=..` per `;`."""
    for setting in filter(None, settings.split(";")):
        kv = dict(part.split("=") for part in setting.split(","))
        if "nprobe" in kv:
            nprobe = int(kv["nprobe"])
            for part in index.patch_index.parts:
                faiss.ParameterSpace().set_index_parameters(part, f"nprobe={nprobe},quantizer_efSearch={2 * nprobe}")
        args = {k: int(v) for k, v in kv.items() if k in ("per_patch", "candidates")}
        timed(lambda fb: search_region(index, fb[0], fb[1], 10, **args), r_q[:3])  # warm the pages these touch
        hits, ms = timed(lambda fb: search_region(index, fb[0], fb[1], 10, **args), r_q)
        print(f"  region search [{setting}] p50 {np.percentile(ms, 50):.1f} ms  p95 {np.percentile(ms, 95):.1f} ms  "
              f"recall@10 {recall([[h.id for h in hs] for hs in hits], kept_truth):.3f} vs the slots stored")


def run_one(count: int, patches: str, index_type: str, args, work: Path) -> None:
    data = Synthetic(count, grid=(4, 4) if args.direct_patches else GRID, structure=args.structure)
    out = work / f"{count}-{patches}-{index_type}-{args.structure}{'-direct' if args.direct_patches else ''}"
    reused = args.keep and (out / "manifest.json").is_file()
    build_s = 0.0 if reused else build(out, data, count, patches, index_type)
    disk = Counter()
    for f in out.rglob("*"):  # the index files, in each segment's folder
        if f.is_file():
            disk[f.name] += f.stat().st_size
    before = rss_mb()
    index = load_index(out)
    loaded = rss_mb()
    g_q, r_q = queries(data, args.queries, args.region_queries)
    feats = [Features(q[None], np.zeros((1, 0, DIM), np.float32), data.grid, [SIZE]) for q in g_q]
    g_hits, g_ms = timed(lambda f: search_image(index, f, 10), feats)
    r_hits, r_ms = timed(lambda fb: search_region(index, fb[0], fb[1], 10), r_q)
    served = rss_mb()
    r_query = [fb[0].patches[0, patches_in(Box(*fb[1]), SIZE, data.grid)] for fb in r_q]
    layout = index.layout  # what the build stored (`auto` resolved by the writer)
    g_truth, r_truth, kept_truth = cached_truth(out, args.keep, (args.queries, args.region_queries), lambda: exact_truth(data, count, g_q, r_query, layout))
    m = index.manifest
    print(f"\n{count:,} images, patches={patches} ({m['patches_per_image']}/image), index-type={index_type}")
    print(f"  global: {m['global_factory']} [{m['global_search']}]  patch: {m['patch_factory']} [{m['patch_search']}]")
    print(f"  build+train (from vectors): {build_s:.1f} s = {count / build_s:,.0f} images/s" if build_s
          else f"  reused the folder built earlier: {out}")
    print(f"  disk per image: " + ", ".join(f"{k} {v / count:,.0f} B" for k, v in sorted(disk.items())
                                            if k.endswith((".faiss", ".npy"))))
    print(f"  RSS: +{loaded - before:,.0f} MB on open, +{served - before:,.0f} MB after the queries (touched pages)")
    print(f"  image search  p50 {np.percentile(g_ms, 50):.2f} ms  p95 {np.percentile(g_ms, 95):.2f} ms  "
          f"recall@10 {recall([[h.id for h in hs] for hs in g_hits], g_truth):.3f}")
    print(f"  region search p50 {np.percentile(r_ms, 50):.1f} ms  p95 {np.percentile(r_ms, 95):.1f} ms  "
          f"recall@10 {recall([[h.id for h in hs] for hs in r_hits], r_truth):.3f} vs exact over all patches, "
          f"{recall([[h.id for h in hs] for hs in r_hits], kept_truth):.3f} vs exact over the {layout.mode} slots stored")
    sweep(index, r_q, kept_truth, args.region_sweep)
    del index
    if not args.keep:
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated image counts")
    p.add_argument("--patches", default="all,pooled,salient", help="comma-separated --patches layouts")
    p.add_argument("--index-type", default="auto", help="auto, flat or compressed (comma-separated to compare)")
    p.add_argument("--queries", type=int, default=200, help="image-search queries")
    p.add_argument("--region-queries", type=int, default=30, help="region-search queries")
    p.add_argument("--structure", default="hierarchical", choices=STRUCTURES, help="how the synthetic concepts relate (see Synthetic)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--direct-patches", action="store_true",
                   help="generate 16 patches per image directly (a 4x4 grid) instead of 196 reduced by the layout: for 1M")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep each built folder in --work and reuse one already there")
    p.add_argument("--region-sweep", default="", help="more region-search settings to time, e.g. "
                   "'nprobe=128,per_patch=64,candidates=100;nprobe=64' (recall against the stored slots)")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}; {args.threads} threads; synthetic clustered vectors ({args.structure} concepts), {DIM} dims")
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    for count in map(int, args.sizes.split(",")):
        for patches in args.patches.split(","):
            for index_type in args.index_type.split(","):
                run_one(count, patches, index_type, args, work)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
