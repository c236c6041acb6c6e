"""Adding to a living index: what an add costs against a rebuild, and what it does to search.

Per size N: build an index of N synthetic images (benchmarks/scale.py's generator, through the real
`index.Writer`), add 1,000 and 1% of N to copies of it the way `index_builder add` does (a new segment
filled into the folder's trained quantisers, no retraining), add 10% to the folder itself, and build
the same N + 10% images afresh. Image and region search (one query at a time, `search_image` /
`search_region`) are timed and scored (recall@10 against exact numpy search: CLS inner product, and
region score over the patch slots the layout stores) on the index as built, after the add, and
rebuilt. Times are the index's own work (Writer calls, and opening the folder for an add), not
generating the synthetic vectors. Then a small real case: photos of assets/collection through a
ViT-S/16 with random weights (benchmarks/vits16.py), `build_index` on most, `add_to_index` for the rest,
against `build_index` on all.

    .venv/bin/python benchmarks/add.py --sizes 10000,100000 --patches salient
    .venv/bin/python benchmarks/add.py --sizes 1000000 --patches salient:1 --direct-patches --add 1000 --grow 0.01 \
        --no-rebuild --no-photos    # 1M: the image side at full size, one patch slot per image (~16 min on 2 cores)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dino_demo.index import load_index  # noqa: E402
from dino_demo.index_types import choose_layout  # noqa: E402
from dino_demo.index_writer import Writer, now  # noqa: E402
from dino_demo.model import Features  # noqa: E402
from dino_demo.patch_select import PatchLayout, reduce_patches  # noqa: E402
from dino_demo.geometry import Box, patches_in  # noqa: E402
from dino_demo.search import search_image, search_region  # noqa: E402

from scale import CHUNK, DIM, GRID, SIZE, STRUCTURES, Synthetic, queries, recall, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"id": "synthetic-vits16", "revision": None, "type": "vit", "input_size": 224, "patch_size": 16, "dim": DIM}
EXTRA_SOURCE = {"dataset": "synthetic-extra", "split": "train", "revision": None, "image_column": "image",
                "label_column": None}


def pieces(start: int, count: int) -> list[tuple[int, int]]:
    """Generator chunks (start, n) covering images [start, start + count): the same vectors every call."""
    return [(s, min(CHUNK, start + count - s)) for s in range(start, start + count, CHUNK)]


def meta_rows(start: int, n: int) -> list[dict]:
    return [{"source_row": start + i, "width": SIZE[0], "height": SIZE[1], "label": None, "thumbnail": None,
             "hash": f"synthetic-{start + i}"} for i in range(n)]


@dataclass
class Truth:
    """Exact scores of every image written so far against the queries, in id order (ids follow writing
    order in a build, an add and a rebuild alike), for brute-force top-k of the first n images."""

    global_q: np.ndarray  # (q, d)
    region_q: list[np.ndarray]  # each (m, d): a region's patches
    layout: PatchLayout
    grid: tuple[int, int]
    g_scores: list = field(default_factory=list)
    r_scores: list = field(default_factory=list)

    def see(self, cls: np.ndarray, patches: np.ndarray) -> None:
        stacked = np.concatenate(self.region_q)
        bounds = np.cumsum([0] + [len(q) for q in self.region_q])
        kept = reduce_patches(self.layout, cls, patches, self.grid)[0]  # (n, slots, d): what the index stores
        best = (kept.reshape(-1, DIM) @ stacked.T).reshape(len(kept), -1, len(stacked)).max(axis=1)
        self.g_scores.append(cls @ self.global_q.T)
        self.r_scores.append(np.stack([best[:, a:b].mean(axis=1) for a, b in zip(bounds, bounds[1:])], axis=1))

    def top(self, n: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(queries, k) exact image and region top-k ids among images [0, n)."""
        top = lambda s: np.argsort(-np.concatenate(s)[:n], axis=0, kind="stable")[:k].T  # noqa: E731
        return top(self.g_scores), top(self.r_scores)


def write_images(writer: Writer, data: Synthetic, parts: list[tuple[int, int]], truth: Truth | None) -> float:
    """Feed `parts` to `writer` chunk by chunk; seconds spent in the writer (not generating)."""
    spent = 0.0
    for start, n in parts:
        cls, patches, _ = data.images(start, n)
        if truth is not None:
            truth.see(cls, patches)
        t = time.perf_counter()
        writer.add_chunk(start, start + n, cls, patches, meta_rows(start, n), Counter())
        spent += time.perf_counter() - t
    return spent


def build(out: Path, data: Synthetic, parts, layout: PatchLayout, index_type: str, truth: Truth | None = None) -> float:
    """A fresh index of `parts`; seconds of writer time (chunks, training, filling, writing)."""
    writer = Writer(out, {"model": {**MODEL, "grid": list(data.grid)}, "source": {"dataset": "synthetic"},
                          "skip_faces": False, "thumb_size": 0, "index_type": index_type,
                          "patches": layout.describe()})
    spent = write_images(writer, data, parts, truth)
    t = time.perf_counter()
    writer.finalize({}, index_type)
    return spent + time.perf_counter() - t


def add(folder: Path, data: Synthetic, parts, truth: Truth | None = None) -> float:
    """Add `parts` to a finished folder as `index_builder add` does; seconds, opening the folder included."""
    t = time.perf_counter()
    index = load_index(folder)
    m = index.manifest
    sources = list(m["sources"]) + [EXTRA_SOURCE]
    info = {"action": "add", "model": m["model"], "patches": m.get("patches"), "source": EXTRA_SOURCE,
            "base_generation": index.generation}
    writer = Writer(folder, info, source_number=len(sources) - 1)
    spent = time.perf_counter() - t + write_images(writer, data, parts, truth)
    t = time.perf_counter()
    added = sum(n for _, n in parts)
    writer.finalize_addition(index, {"action": "add", "time": now(), "source": len(sources) - 1, "images": added,
                                     "skipped": {}}, sources)
    return spent + time.perf_counter() - t


def trained_files(folder: Path) -> dict[str, str]:
    """Name -> digest of the folder's trained (empty) FAISS indexes: an add must leave them as they are."""
    return {f.name: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(folder.glob("trained-*.faiss"))}


@dataclass
class Searched:
    """Search figures of one state of an index."""

    label: str
    segments: int
    image_ms: np.ndarray
    image_recall: float
    region_ms: np.ndarray
    region_recall: float


def measure_search(label: str, folder: Path, g_feats, r_queries, truth: tuple[np.ndarray, np.ndarray],
                   warmup: int) -> Searched:
    """Image and region search one query at a time, after `warmup` untimed queries of each kind."""
    index = load_index(folder)
    for f in g_feats[:warmup]:
        search_image(index, f, 10)
    for feats, box in r_queries[:warmup]:
        search_region(index, feats, box, 10)
    g_found, g_ms = timed(lambda f: [h.id for h in search_image(index, f, 10)], g_feats)
    r_found, r_ms = timed(lambda fb: [h.id for h in search_region(index, fb[0], fb[1], 10)], r_queries)
    result = Searched(label, len(index.segments), g_ms, recall(g_found, truth[0]), r_ms, recall(r_found, truth[1]))
    del index
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def add_sizes(text: str, count: int) -> list[int]:
    """'1000,1%' -> [1000, count // 100], without repeats."""
    sizes = [max(1, int(count * float(s[:-1]) / 100)) if s.endswith("%") else int(s) for s in text.split(",")]
    return list(dict.fromkeys(sizes))


def run_size(count: int, args, work: Path) -> None:
    data = Synthetic(count, grid=(4, 4) if args.direct_patches else GRID, structure=args.structure)
    layout = choose_layout(args.patches, count)  # kept by the rebuild too, as `compact` keeps it
    g_q, r_q = queries(data, args.queries, args.region_queries)
    g_feats = [Features(q[None], np.zeros((1, 0, DIM), np.float32), data.grid, [SIZE]) for q in g_q]
    truth = Truth(g_q, [fb[0].patches[0, patches_in(Box(*fb[1]), SIZE, data.grid)] for fb in r_q], layout, data.grid)
    grow = max(1, int(round(count * args.grow)))
    base = work / f"{count}-base"
    print(f"\n== {count:,} images, patches={layout.mode}{f':{layout.keep}' if layout.keep else ''}, "
          f"grid {data.grid}, index-type {args.index_type}; load average {os.getloadavg()[0]:.2f}", flush=True)

    build_s = build(base, data, pieces(0, count), layout, args.index_type, truth)
    m = load_index(base).manifest
    print(f"  factories: global {m['global_factory']} [{m['global_search']}], patch {m['patch_factory']} "
          f"[{m['patch_search']}], {m['patches_per_image']} slots/image", flush=True)
    print(f"  build {count:,}: {build_s:.1f} s", flush=True)
    trained = trained_files(base)

    states = [measure_search(f"built {count:,}", base, g_feats, r_q, truth.top(count), args.warmup)]
    adds = []
    for k in add_sizes(args.add, count):
        copy = work / f"{count}-plus-{k}"
        shutil.copytree(base, copy)
        seconds = add(copy, data, pieces(count, k))
        assert trained_files(copy) == trained, "an add changed the trained indexes"
        adds.append((k, seconds))
        print(f"  add {k:,} to a copy: {seconds:.2f} s", flush=True)
        shutil.rmtree(copy)

    grow_s = add(base, data, pieces(count, grow), truth)
    assert trained_files(base) == trained, "an add changed the trained indexes"
    print(f"  add {grow:,} ({args.grow:.0%}) to the folder: {grow_s:.2f} s; trained indexes unchanged", flush=True)
    states.append(measure_search(f"built {count:,} + added {grow:,}", base, g_feats, r_q, truth.top(count + grow),
                                 args.warmup))
    rebuild_s = None
    if not args.no_rebuild:
        shutil.rmtree(base)
        fresh = work / f"{count + grow}-rebuilt"
        rebuild_s = build(fresh, data, pieces(0, count) + pieces(count, grow), layout, args.index_type)
        print(f"  rebuild {count + grow:,}: {rebuild_s:.1f} s", flush=True)
        states.append(measure_search(f"rebuilt {count + grow:,}", fresh, g_feats, r_q, truth.top(count + grow),
                                     args.warmup))
        shutil.rmtree(fresh)
    else:
        shutil.rmtree(base)
    print_tables(count, m, build_s, adds, grow, grow_s, rebuild_s, states)


def print_tables(count, m, build_s, adds, grow, grow_s, rebuild_s, states) -> None:
    per = f"{m['patches_per_image']} slots"
    print(f"\n| images | global / patch factory ({per}) | build N | rebuild N + {grow:,} | add | add time | "
          f"add / build N | add / rebuild |")
    print("|---|---|---|---|---|---|---|---|")
    rebuilt = f"{rebuild_s:.1f} s" if rebuild_s else "not run"
    for k, seconds in adds + [(grow, grow_s)]:
        vs_rebuild = f"{seconds / rebuild_s:.2%}" if rebuild_s else "—"
        print(f"| {count:,} | {m['global_factory']} / {m['patch_factory']} | {build_s:.1f} s | {rebuilt} | "
              f"{k:,} ({k / count:.1%}) | {seconds:.2f} s | {seconds / build_s:.2%} | {vs_rebuild} |")
    print("\n| index state | segments | image p50 / p95 ms | image recall@10 | region p50 / p95 ms | region recall@10 |")
    print("|---|---|---|---|---|---|")
    for s in states:
        print(f"| {s.label} | {s.segments} | {np.percentile(s.image_ms, 50):.2f} / {np.percentile(s.image_ms, 95):.2f} "
              f"| {s.image_recall:.3f} | {np.percentile(s.region_ms, 50):.1f} / {np.percentile(s.region_ms, 95):.1f} "
              f"| {s.region_recall:.3f} |")
    print(f"\npeak RSS so far: {peak_rss_mb():,.0f} MB", flush=True)


def run_photos(args, work: Path) -> None:
    """Real photos through the model: build most, add the rest, against building all; wall seconds."""
    from dino_demo.model import Embedder
    from index_builder.build import BuildOptions, add_to_index, build_index
    from index_builder.source import open_source
    from vits16 import save_vits16

    photos = sorted((ROOT / "assets" / "collection").glob("*.jpg"))
    built = int(round(len(photos) * args.photos_built))
    folders = {name: work / f"photos-{name}" for name in ("base", "extra", "all")}
    for name, chosen in (("base", photos[:built]), ("extra", photos[built:]), ("all", photos)):
        folders[name].mkdir()
        for p in chosen:
            shutil.copy(p, folders[name])
    embedder = Embedder(str(save_vits16(work / "vits16")), device="cpu")
    options = BuildOptions(workers=0, skip_faces=False)
    open_source(str(folders["all"]))  # datasets' first-use cost, outside the timings
    from PIL import Image
    embedder.embed([Image.open(photos[0]).convert("RGB")])  # the model's first-call cost too
    out, fresh = work / "photos-index", work / "photos-rebuilt"
    t = time.perf_counter()
    build_index(open_source(str(folders["base"])), embedder, str(out), options)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    report = add_to_index(open_source(str(folders["extra"])), embedder, str(out), options)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    build_index(open_source(str(folders["all"])), embedder, str(fresh), options)
    rebuild_s = time.perf_counter() - t
    after = load_index(out)
    print(f"\n== {len(photos)} photos of assets/collection, ViT-S/16 random weights, CPU, face gate off")
    print("\n| step | images | wall time | per image |")
    print("|---|---|---|---|")
    for step, n, s in (("build", built, build_s), ("add", report.indexed, add_s), ("rebuild all", len(photos), rebuild_s)):
        print(f"| {step} | {n} | {s:.2f} s | {s / max(n, 1) * 1000:.0f} ms |")
    print(f"\nafter the add: {after.count} images in {len(after.segments)} segments; add / rebuild = "
          f"{add_s / rebuild_s:.0%}; peak RSS so far {peak_rss_mb():,.0f} MB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated image counts (1000000 only when asked)")
    p.add_argument("--patches", default="auto", help="patch layout: auto (as the builder), all, pooled, salient[:N]")
    p.add_argument("--index-type", default="auto", help="auto, flat or compressed")
    p.add_argument("--add", default="1000,1%", help="images added to copies of the built index (N or N%%)")
    p.add_argument("--grow", type=float, default=0.10, help="fraction of N added before searching again")
    p.add_argument("--no-rebuild", action="store_true", help="skip the fresh build of N + grown (for 1M)")
    p.add_argument("--queries", type=int, default=200, help="image-search queries")
    p.add_argument("--region-queries", type=int, default=20, help="region-search queries")
    p.add_argument("--warmup", type=int, default=10, help="untimed queries of each kind before timing a state")
    p.add_argument("--structure", default="hierarchical", choices=STRUCTURES)
    p.add_argument("--direct-patches", action="store_true", help="16 patches per image on a 4x4 grid (as scale.py)")
    p.add_argument("--photos-built", type=float, default=0.8, help="share of the photos built; the rest are added")
    p.add_argument("--no-photos", action="store_true", help="skip the real-photo case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir, deleted at the end)")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="add-bench-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "datasets-cache"))  # before datasets is imported
    print(f"{now()}; {args.threads} threads; synthetic {args.structure} vectors, {DIM} dims; work in {work}")
    try:
        for count in map(int, args.sizes.split(",")):
            run_size(count, args, work)
        if not args.no_photos:
            run_photos(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{now()}; load average {os.getloadavg()}; peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
