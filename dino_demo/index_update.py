"""Change a finished index folder: remove images (tombstones) and compact (rewrite without them).

Removing writes a new tombstone file and a new manifest: every search filters the removed ids at
once (an HNSW graph cannot delete). `compact` rewrites the folder as one segment of the images
that remain, retraining the FAISS indexes for its size; ids never change, so nothing needs a
mapping. Both hold the folder's lock, and a kill at any point leaves the old state or the new.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .index import META_SCHEMA, TOMBSTONE_SCHEMA, Index, IndexFolderError, load_index
from .index_writer import THUMB_GROUP, Writer, commit, hold_lock, now, write_tombstones

COMPACT_CHUNK = 8 * THUMB_GROUP  # images per compaction chunk: whole thumbnail row groups
# Manifest fields a compaction computes anew; it carries every other one over.
RECOMPUTED = ("format_version", "generation", "segments", "stored", "count", "global_factory", "global_search",
              "patch_factory", "patch_search", "trained", "trained_on", "updated")
MATCHABLE = ("label", "source_row", "source", "hash", "width", "height")  # what --where may test


class SelectionError(UserError):
    """A removal that names no image, or images not in the index."""


@dataclass
class Removal:
    removed: list[int]  # ids taken out by this call
    already: list[int]  # ids asked for that were removed before
    manifest: dict


def select_ids(index: Index, ids: Iterable[int] = (), source_rows: Iterable[int] = (), source: int = 0,
               where: tuple[str, str] | None = None) -> list[int]:
    """Ids of the images named by id, by row of one of the index's sources, or by a column's value."""
    found = [int(i) for i in ids]
    meta = index.meta  # live images only
    rows = set(int(r) for r in source_rows)
    if rows:
        sources = np.asarray(meta.column("source").fill_null(0).to_numpy(zero_copy_only=False))
        hit = np.isin(meta.column("source_row").to_numpy(), list(rows)) & (sources == source)
        found += meta.column("id").to_numpy()[hit].tolist()
        missing = rows - set(meta.column("source_row").to_numpy()[hit].tolist())
        if missing:
            raise SelectionError(f"Source {source} has no indexed row {few(missing)} (skipped, removed or never added).")
    if where is not None:
        column, value = where
        if column not in MATCHABLE:
            raise SelectionError(f"--where can test {', '.join(MATCHABLE)}, not {column!r}.")
        values = [str(v) for v in meta.column(column).to_pylist()]
        found += [int(i) for i, v in zip(meta.column("id").to_pylist(), values) if v == value]
    return sorted(set(found))


def remove_images(folder: str | Path, ids: Iterable[int], reason: str) -> Removal:
    """Take images out of every search at once by adding their ids to the tombstones; ids stay used."""
    folder = Path(folder)
    with hold_lock(folder):
        index = load_index(folder)
        ids = sorted(set(int(i) for i in ids))
        if not ids:
            raise SelectionError("Nothing to remove: no image matches.")
        removed_before = set(index.removed.tolist())
        already = [i for i in ids if i in removed_before]
        unknown = [i for i in ids if i not in removed_before and not index.has(i)]
        if unknown:
            raise SelectionError(f"{folder} has no image {few(unknown)}; ids run from 0 to {int(index.ids[-1])}.")
        new = [i for i in ids if i not in removed_before]
        if not new:
            return Removal([], already, index.manifest)
        old = index.manifest
        generation = index.generation + 1
        tombstones = _tombstones(index)
        all_ids = np.concatenate([tombstones.column("id").to_numpy(), np.array(new, np.int64)])
        meta = index.meta
        hash_of = dict(zip(meta.column("id").to_pylist(), meta.column("hash").to_pylist())) \
            if "hash" in meta.column_names else {}
        hashes = tombstones.column("hash").to_pylist() + [hash_of.get(i) for i in new]
        name = write_tombstones(folder, generation, all_ids, hashes)
        entry = {"action": "remove", "time": now(), "images": len(new), "by": reason}
        manifest = dict(old, generation=generation, removed=name, removed_count=int((all_ids >= 0).sum()),
                        count=index.count - len(new), updated=now(), history=old.get("history", []) + [entry])
        commit(folder, manifest)
        return Removal(new, already, manifest)


def compact(folder: str | Path, progress: Callable[[int, int], None] | None = None) -> dict:
    """Rewrite the folder as one segment of the images that remain (ids kept), with FAISS indexes
    chosen and trained for its size now; resumable like a build. Returns the new manifest."""
    folder = Path(folder)
    with hold_lock(folder):
        index = load_index(folder)
        old = index.manifest
        if index.count == 0:
            raise IndexFolderError(f"Every image of {folder} was removed; build a new index instead.")
        info = {"action": "compact", "model": old["model"], "patches": old.get("patches"),
                "base_generation": index.generation}
        writer = Writer(folder, info)
        start = writer.resume_row()
        for first, segment in zip(index._starts, index.segments):
            for at in range(0, len(segment.ids), COMPACT_CHUNK):
                if first + at >= start:
                    _copy_chunk(index, segment, at, writer, int(first + at))
                if progress is not None:
                    progress(int(first + at + min(COMPACT_CHUNK, len(segment.ids) - at)), len(index.ids))
        keep = {k: v for k, v in old.items() if k not in RECOMPUTED}
        entry = {"action": "compact", "time": now(), "stored_before": len(index.ids), "kept": index.count}
        keep["history"] = old.get("history", []) + [entry]
        return writer.finalize({"updated": now()}, old.get("index_type", "auto"), keep=keep, keep_ids=True)


def _copy_chunk(index: Index, segment, at: int, writer: Writer, row_start: int) -> None:
    """Save the live images of segment rows [at, at + COMPACT_CHUNK) as a chunk, ids and all."""
    n = min(COMPACT_CHUNK, len(segment.ids) - at)
    live = ~np.isin(segment.ids[at:at + n], index.removed)
    per_image, dim = index.patches_per_image, index.manifest["model"]["dim"]
    cls = segment.global_index.reconstruct_n(at, n)[live]
    patches = segment.patch_index.reconstruct_n(at * per_image, n * per_image).reshape(n, per_image, dim)[live]
    cells = None if segment.cells is None else np.asarray(segment.cells[at:at + n])[live]
    groups = range(at // THUMB_GROUP, (at + n - 1) // THUMB_GROUP + 1)
    meta = segment.thumbnails.read_row_groups(list(groups)).filter(pa.array(live))
    for name in META_SCHEMA.names[len(meta.column_names):]:  # a format-1 folder: no source or hash yet
        meta = meta.append_column(META_SCHEMA.field(name), pa.nulls(meta.num_rows, META_SCHEMA.field(name).type))
    writer.save_chunk(row_start, row_start + n, cls, patches, cells, meta, Counter())


def _tombstones(index: Index) -> pa.Table:
    name = index.manifest.get("removed")
    return pq.read_table(index.path / name) if name else TOMBSTONE_SCHEMA.empty_table()


def few(values, most: int = 10) -> str:
    """Ids or rows as a short list: the first `most`, then how many more."""
    values = sorted(values)
    return ", ".join(map(str, values[:most])) + (f" and {len(values) - most} more" if len(values) > most else "")
