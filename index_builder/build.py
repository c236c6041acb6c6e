"""Source rows -> decoded, face-checked, resized images -> embeddings -> index.Writer.

Decoding runs in worker processes (`decode_rows`) a few batches ahead of the model, so the
GPU does not wait on JPEG decoding. Rows are taken in order and written in chunks, which is
what lets a killed build resume where it stopped with every image exactly once.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from dino_demo.faces import FaceGate
from dino_demo.images import ImageError, load_image, make_thumbnail
from dino_demo.index import Writer
from dino_demo.index_types import choose_layout
from dino_demo.model import Embedder, prepare_image

from .source import Row, Source


@dataclass
class BuildOptions:
    batch_size: int = 64
    workers: int = 4  # decoding processes; 0 decodes in this process
    chunk_size: int = 1024  # images per resumable chunk: a kill loses at most this much work
    thumb_size: int = 256  # longer side of the stored thumbnails, in pixels
    skip_faces: bool = True
    limit: int | None = None  # stop after this many source rows
    max_pixels: int = 40_000_000
    patches: str = "all"  # patch vectors stored per image: all | pooled | salient[:N] | auto (by size)
    index_type: str = "auto"  # auto (by size) | flat (exact) | compressed (HNSW / IVF-PQ); see index_types


@dataclass
class Decoded:
    """A batch of rows turned into model inputs; what could not be used is counted by reason."""

    rows: list[int] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)  # each (S, S, 3) uint8
    meta: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_row: int = 0
    last_row: int = -1


@dataclass
class BuildReport:
    indexed: int
    skipped: Counter
    seconds: float
    resumed_from: int  # first source row of this run
    rows_this_run: int
    manifest: dict


_gate: FaceGate | None = None  # one per decoding process, made on first use


def decode_rows(rows: list[Row], input_size: int, thumb_size: int, skip_faces: bool, max_pixels: int) -> Decoded:
    """Decode, check and resize a batch of rows; runs in a worker process."""
    global _gate
    out = Decoded(first_row=rows[0].index, last_row=rows[-1].index)
    for row in rows:
        if row.image is None:
            out.skipped["missing image"] += 1
            continue
        try:
            image = load_image(row.image, max_pixels=max_pixels)
        except ImageError as e:
            out.skipped[e.reason] += 1
            continue
        if skip_faces:
            _gate = _gate or FaceGate()
            if _gate.check(image).has_face:
                out.skipped["face"] += 1
                continue
        out.rows.append(row.index)
        out.pixels.append(prepare_image(image, input_size))
        out.meta.append({
            "source_row": row.index, "width": image.width, "height": image.height, "label": row.label,
            "thumbnail": make_thumbnail(image, thumb_size) if thumb_size else None,
        })
    return out


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded(batches: Iterator[list[Row]], args: tuple, workers: int) -> Iterator[Decoded]:
    """Decoded batches in source order, `workers` processes working a bounded distance ahead."""
    if workers <= 0:
        for batch in batches:
            yield decode_rows(batch, *args)
        return
    # fork is cheap and the workers never touch torch; spawn where fork is unsafe (macOS).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(decode_rows, (batch, *args)))
            if len(pending) >= 2 * workers:  # bounded: a huge dataset is never queued whole
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build_index(source: Source, embedder: Embedder, out_dir: str, options: BuildOptions, progress=None) -> BuildReport:
    """Build (or resume building) the index folder `out_dir` from `source` and return a report."""
    build_info = {
        "model": embedder.describe(),
        "source": source.describe(),
        "skip_faces": options.skip_faces,
        "thumb_size": options.thumb_size,
        "patches": choose_layout(options.patches, source.num_rows, options.limit).describe(),
    }
    writer = Writer(out_dir, build_info)
    start = writer.resume_row()
    started = time.perf_counter()
    args = (embedder.input_size, options.thumb_size, options.skip_faces, options.max_pixels)
    batches = _batches(source.rows(start, options.limit), options.batch_size)
    buffer = _ChunkBuffer(start)
    for decoded in _decoded(batches, args, options.workers):
        if decoded.pixels:
            sizes = [(m["width"], m["height"]) for m in decoded.meta]
            features = embedder.embed_prepared(np.stack(decoded.pixels), sizes)
            buffer.add(decoded, features.cls, features.patches)
        else:
            buffer.add(decoded, None, None)
        if progress is not None:
            progress(decoded)
        if buffer.count >= options.chunk_size:
            buffer.flush(writer)
    buffer.flush(writer)
    manifest = writer.finalize({}, options.index_type)
    seconds = time.perf_counter() - started
    rows = buffer.row_end - start
    return BuildReport(manifest["count"], Counter(manifest["skipped"]), seconds, start, rows, manifest)


class _ChunkBuffer:
    """Features of consecutive rows waiting to be written as one chunk."""

    def __init__(self, row_start: int):
        self.row_start = self.row_end = row_start
        self._reset()

    def _reset(self) -> None:
        self.cls, self.patches, self.meta, self.skipped = [], [], [], Counter()

    @property
    def count(self) -> int:
        return len(self.meta)

    def add(self, decoded: Decoded, cls, patches) -> None:
        if cls is not None:
            self.cls.append(cls)
            self.patches.append(patches)
        self.meta += decoded.meta
        self.skipped += decoded.skipped
        self.row_end = decoded.last_row + 1

    def flush(self, writer: Writer) -> None:
        if self.row_end == self.row_start:
            return
        cls = np.concatenate(self.cls) if self.cls else np.zeros((0, 0), np.float32)
        patches = np.concatenate(self.patches) if self.patches else np.zeros((0, 0, 0), np.float32)
        writer.add_chunk(self.row_start, self.row_end, cls, patches, self.meta, self.skipped)
        self.row_start = self.row_end
        self._reset()
