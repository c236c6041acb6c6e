"""FAISS index types chosen by collection size, kept as data: a factory string and search parameters.

The rule (also in the README, Scale): up to `FLAT_MAX` vectors an index is exact (`Flat`, inner
product). Beyond:

- CLS vectors (image search) go into an HNSW graph over 8-bit scalar codes (`HNSW32,SQ8`, built
  with efConstruction `EF_CONSTRUCTION`): a graph finds neighbours that an inverted file scatters
  over many lists. Measured against IVF-PQ in benchmarks/RESULTS.md, "Image search at 100k and 1M".
- Patch vectors (region search, tens of slots per image) go into `IVF{nlist}_HNSW32,PQ{m}x8,Refine(SQ8)`:
  an inverted file of product-quantised codes finds candidates, and 8-bit codes of every vector
  re-score them. nlist ~ 4·sqrt(n) (a power of two), m = one byte per 12 dims, trained on a sample of
  at most `TRAIN_MAX` vectors. A graph over every patch would keep its links (32 per vector) in RAM.

Under `COMPRESSED_MIN` vectors an index is always exact. Files are opened with IO_FLAG_MMAP_IFC, so
codes and inverted lists stay on disk (only an HNSW graph's links are read into RAM) and only the
pages a query touches are read. Every figure behind these choices is in benchmarks/RESULTS.md, "Scale".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import faiss
import numpy as np

from .errors import UserError
from .patch_select import PatchLayout

INDEX_TYPES = ("auto", "flat", "compressed")
# Exact search time grows with the set (RESULTS.md, Scale): keep it to small sets.
FLAT_MAX = {"global": 20_000, "patch": 50_000}
COMPRESSED_MIN = 1_000  # fewer vectors cannot train a quantiser, and exact search of them is instant
PATCH_DIMS_PER_BYTE = 12  # PQ code bytes of a patch vector: one per 12 dims (32 at 384 dims)
EF_CONSTRUCTION = 160  # FAISS's default (40) built a 1M graph with far lower recall (RESULTS.md, Scale)
TRAIN_MAX = 200_000  # enough for 4096 lists x ~40 points; more only slows training
ALL_PATCHES_MAX_IMAGES = 20_000  # beyond, `--patches auto` stores 2x2-pooled patches
# Lists a patch query probes, at most: at 1M images (16M patch vectors, 16384 lists) 128 kept region
# recall@10 at 0.988 in 18 ms where nlist/32 (512) took 62 ms (RESULTS.md, "Region search at 1M").
NPROBE_MAX = 128


@dataclass(frozen=True)
class IndexSpec:
    """What to build for one kind of vector: a FAISS factory string and its search parameters."""

    factory: str  # "Flat", "HNSW32,SQ8" or e.g. "IVF4096_HNSW32,PQ32x8,Refine(SQ8)"
    search_params: str  # faiss ParameterSpace string, e.g. "efSearch=128" or "nprobe=128,quantizer_efSearch=256,k_factor_rf=1"

    @property
    def trained(self) -> bool:
        return self.factory != "Flat"


def choose_spec(count: int, dim: int, kind: str, index_type: str = "auto") -> IndexSpec:
    """The index for `count` vectors of `dim` dims; `kind` is 'global' or 'patch'."""
    if index_type not in INDEX_TYPES:
        raise UserError(f"--index-type {index_type!r} is not one of {', '.join(INDEX_TYPES)}.")
    if index_type == "flat" or count < COMPRESSED_MIN or (index_type == "auto" and count <= FLAT_MAX[kind]):
        return IndexSpec("Flat", "")
    if kind == "global":
        # efSearch (graph nodes kept in view): 128 holds recall up to 200k images and falls short at
        # 1M, where 256 restores it (benchmarks/RESULTS.md, "Image search at 100k and 1M").
        return IndexSpec("HNSW32,SQ8", f"efSearch={128 if count <= 200_000 else 256}")
    nlist = _nlist(count)
    # Patch hits only vote for candidates that are then re-ranked (search.py), so a few lists
    # suffice, and each hit is re-scored from its 8-bit codes once (k_factor_rf=1). Scanning the
    # probed lists is most of a region search, so nprobe stops growing at NPROBE_MAX.
    nprobe = min(nlist, max(8, min(nlist // 32, NPROBE_MAX)))
    m = _bytes_per_code(dim, PATCH_DIMS_PER_BYTE)
    bits = 8 if count >= 256 * 39 else 4  # a small forced-compressed set cannot train 256 centroids
    params = f"nprobe={nprobe},quantizer_efSearch={2 * nprobe},k_factor_rf=1"
    # `_HNSW32`: a graph over the centroids assigns vectors to lists without comparing each to all
    # nlist centroids, which dominates adding millions of vectors.
    return IndexSpec(f"IVF{nlist}_HNSW32,PQ{m}x{bits},Refine(SQ8)", params)


def choose_layout(patches: str, num_rows: int | None, limit: int | None = None) -> PatchLayout:
    """The patch layout for `--patches`; `auto` keeps every patch of a small collection only, and
    pools beyond: it kept more region recall than `salient` in benchmarks/scale.py (RESULTS.md)."""
    if patches != "auto":
        return PatchLayout.parse(patches)
    known = [x for x in (num_rows, limit) if x is not None]  # a stream of unknown length counts as large
    return PatchLayout() if known and min(known) <= ALL_PATCHES_MAX_IMAGES else PatchLayout("pooled")


def _nlist(count: int) -> int:
    """A power of two near 4·sqrt(count), with at least ~39 training points per list."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return int(max(1, min(target, 65536, 2 ** int(math.log2(max(1, count // 39))))))


def _bytes_per_code(dim: int, dims_per_byte: int) -> int:
    """The largest divisor of `dim` at most dim / dims_per_byte (PQ needs m to divide d)."""
    target = max(1, dim // dims_per_byte)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def train_size(spec: IndexSpec, count: int) -> int:
    """How many vectors to sample for training: all of a small set, at most TRAIN_MAX."""
    return min(count, TRAIN_MAX) if spec.trained else 0


def build_faiss(spec: IndexSpec, dim: int, sample: np.ndarray, batches: Callable[[], Iterable[np.ndarray]]) -> faiss.Index:
    """Train `spec` on `sample` (n, dim) float32, then add `batches` in id order, one at a time."""
    return fill_faiss(train_faiss(spec, dim, sample), batches())


def train_faiss(spec: IndexSpec, dim: int, sample: np.ndarray) -> faiss.Index:
    """An empty index of `spec`, trained on `sample` (n, dim) float32: the quantiser that later
    additions reuse (kept in the index folder), so adding images never retrains."""
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.factory.startswith("HNSW"):
        index.hnsw.efConstruction = EF_CONSTRUCTION
    if spec.trained:
        step = 1
        if spec.factory.startswith("IVF"):
            ivf = faiss.extract_index_ivf(index)
            # k-means cost grows with points x lists x iterations; ~64 points per list and 10 rounds
            # give nearly the same lists at a fraction of the time on 2 cores.
            ivf.cp.niter = 10
            step = max(1, len(sample) // (64 * ivf.nlist))
        index.train(np.ascontiguousarray(sample[::step], dtype=np.float32))
    return index


def fill_faiss(index: faiss.Index, batches: Iterable[np.ndarray]) -> faiss.Index:
    """Add `batches` of (n, dim) vectors to a trained `index` in id order, one batch at a time."""
    for batch in batches:
        index.add(np.ascontiguousarray(batch, dtype=np.float32))
    return index


def open_faiss_file(path: str, search_params: str) -> faiss.Index:
    """Memory-map an index file (codes and inverted lists stay on disk) and set its search parameters."""
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    return index
