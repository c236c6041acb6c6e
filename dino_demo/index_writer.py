"""Write an index folder: a build's (or an addition's) batches as resumable chunks, then a segment.

Batches are written as chunk folders under `_build/`, named by the source rows they cover and each
made complete before an atomic rename, so a run killed at any moment resumes from its finished
chunks. `finalize` (a new index) and `finalize_addition` (new images for an existing one) then write
one new segment folder and, last, the manifest (`commit`): a folder always opens in the state its
manifest names, the one before a change or the one after, never a mix.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .index import BUILD_DIR, CELLS, FORMAT_VERSION, GLOBAL, MANIFEST, META, META_SCHEMA, PATCHES, \
    TOMBSTONE_SCHEMA, Index, IndexFolderError
from .index_types import IndexSpec, choose_spec, fill_faiss, train_faiss, train_size
from .patch_select import layout_of, reduce_patches

THUMB_GROUP = 128  # rows per parquet row group: reading one thumbnail decodes only its group
LOCK = ".lock"
KINDS = (("global", "cls", GLOBAL), ("patch", "patches", PATCHES))  # (kind, chunk file stem, segment file)


class FolderBusy(IndexFolderError):
    """Another process is changing the index folder."""


@contextmanager
def hold_lock(folder: Path) -> Iterator[None]:
    """Be the only process changing `folder`: a second writer is refused at once. The operating system
    releases the lock when its holder dies, even by kill -9, so a crash never leaves the folder locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderBusy(f"{folder} is being changed by {holder}; wait for it to finish, then run this again.") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} (since {now()})")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


@dataclass
class Chunk:
    """One finished piece of a run: the images of source rows [row_start, row_end)."""

    path: Path
    row_start: int
    row_end: int
    count: int
    skipped: Counter


def unfinished_run(out_dir: Path) -> dict | None:
    """The build_info of the unfinished run in `out_dir` that a Writer there resumes, if there is one."""
    info_path = Path(out_dir) / BUILD_DIR / "build.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    return None if _stale(Path(out_dir), info) else info


class Writer:
    """Collects a run's batches as resumable chunks, then writes them as a segment of the folder."""

    def __init__(self, out_dir: str | Path, build_info: dict, source_number: int = 0):
        """`build_info` (model, source, options, what the run does) must equal a resumed run's;
        `source_number` is the source's place in the manifest's list, stored with each image."""
        self.out = Path(out_dir)
        self.work = self.out / BUILD_DIR
        self.work.mkdir(parents=True, exist_ok=True)
        info_path = self.work / "build.json"
        previous = unfinished_run(self.out)
        if previous is None and info_path.exists():
            shutil.rmtree(self.work)  # a change already committed (or made on a state since replaced)
            self.work.mkdir(parents=True)
        if previous is not None:
            if previous != json.loads(json.dumps(build_info)):
                what = previous.get("action", "build")
                raise IndexFolderError(
                    f"{self.out} holds an unfinished {what} with other settings "
                    f"({_first_difference(previous, build_info)}). Run the same command as before "
                    f"to resume it, or delete {self.work} to start over."
                )
        else:
            atomic.write_bytes(info_path, json.dumps(build_info, indent=2).encode())
        self.build_info, self.source_number = build_info, source_number
        self.layout = layout_of(build_info.get("patches"))
        self.grid = tuple(build_info["model"]["grid"])
        self.dim = build_info["model"]["dim"]
        for stale in self.work.glob("*.tmp*"):  # half-written chunk of a killed run
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()

    def chunks(self) -> list[Chunk]:
        """The finished chunks, in source order."""
        found = []
        for d in sorted(p for p in self.work.glob("rows-*") if p.suffix == ""):
            info = json.loads((d / "info.json").read_text())
            found.append(Chunk(d, info["row_start"], info["row_end"], info["count"], Counter(info["skipped"])))
        return found

    def resume_row(self, start: int = 0) -> int:
        """The first row from `start` on not covered by a finished chunk."""
        for chunk in self.chunks():
            if chunk.row_start == start:
                start = chunk.row_end
        return start

    def hashes(self, before: int | None = None) -> set[str]:
        """Content hashes of the images in finished chunks (ending at or before row `before`, if given):
        a resumed run must not add them again."""
        return {h for c in self.chunks() if c.count and (before is None or c.row_end <= before)
                for h in chunk_hashes(c) if h}

    def chunk_dir(self, row_start: int, row_end: int) -> Path:
        """Where the chunk of source rows [row_start, row_end) lies once finished."""
        return self.work / f"rows-{row_start:012d}-{row_end:012d}"

    def filter_chunk(self, chunk: Chunk, keep: np.ndarray, dropped: Counter) -> None:
        """Rewrite `chunk` with only its images at positions `keep`, the others counted as `dropped`. The old
        one is set aside first: a kill in between leaves its rows to be done again, never done twice."""
        arrays = {name: np.load(chunk.path / f"{name}.npy")[keep] for name in ("cls", "patches", "cells")
                  if (chunk.path / f"{name}.npy").exists()}
        meta = pq.read_table(chunk.path / META).take(pa.array(keep, pa.int64()))
        aside = chunk.path.with_name(f"{chunk.path.name}.old.tmp")
        os.replace(chunk.path, aside)
        self.save_chunk(chunk.row_start, chunk.row_end, arrays["cls"], arrays["patches"], arrays.get("cells"), meta,
                        chunk.skipped + dropped)
        shutil.rmtree(aside)

    def add_chunk(
        self,
        row_start: int,
        row_end: int,
        cls: np.ndarray,  # (n, d) float32, L2-normalised
        patches: np.ndarray,  # (n, p, d) float32, L2-normalised
        meta: list[dict],  # per image: source_row, width, height, label, thumbnail, hash
        skipped: Counter,
    ) -> None:
        """Record the images of source rows [row_start, row_end); rows not in `meta` were skipped."""
        patches, cells = reduce_patches(self.layout, cls, patches, self.grid) if len(meta) else (patches, None)
        rows = [{"source": self.source_number, **row} for row in meta]
        self.save_chunk(row_start, row_end, cls, patches, cells, _meta_table(rows), skipped)

    def save_chunk(self, row_start: int, row_end: int, cls: np.ndarray, patches: np.ndarray,
                   cells: np.ndarray | None, meta: pa.Table, skipped: Counter) -> None:
        """Write a chunk of vectors already in the folder's patch layout: (n, d) and (n, slots, d)."""
        final = self.chunk_dir(row_start, row_end)
        tmp = final.with_name(f"{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed attempt at these rows (a retried worker's)
        tmp.mkdir()
        np.save(tmp / "cls.npy", cls.astype(np.float32))
        np.save(tmp / "patches.npy", patches.astype(np.float16))  # halves the scratch space
        if cells is not None:
            np.save(tmp / "cells.npy", cells)
        pq.write_table(meta, tmp / META)
        info = {"row_start": row_start, "row_end": row_end, "count": meta.num_rows, "skipped": dict(skipped)}
        (tmp / "info.json").write_text(json.dumps(info))
        for file in tmp.iterdir():  # on disk before the rename makes the chunk count: a power cut loses no chunk
            atomic.fsync(file)
        os.replace(tmp, final)
        atomic.fsync(self.work)

    def stored(self) -> int:
        """Images in the finished chunks."""
        return sum(c.count for c in self.chunks())

    def skipped(self) -> Counter:
        return sum((c.skipped for c in self.chunks()), Counter())

    def finalize(self, manifest_extra: dict, index_type: str = "auto", keep: dict | None = None,
                 keep_ids: bool = False) -> dict:
        """Write the chunks as the folder's only segment, with FAISS indexes chosen for their size and
        trained afresh, and return the new manifest. `keep`: what a rewrite carries over from the
        manifest it replaces (sources, history, next id, tombstones); ids stored in the chunks are kept.

        Each FAISS index is trained on a sample and filled chunk by chunk, so the exact vectors of
        a large build are never all in memory at once (the compressed index being built is).
        """
        chunks, skipped = [c for c in self.chunks() if c.count], self.skipped()
        count = sum(c.count for c in chunks)
        if count == 0:
            raise IndexFolderError(f"No image could be indexed (skipped: {describe(skipped)}).")
        generation = _next_generation(self.out)
        slots = self.layout.slots(self.grid)
        specs = {"global": choose_spec(count, self.dim, "global", index_type),
                 "patch": choose_spec(count * slots, self.dim, "patch", index_type)}
        templates, trained = {}, {}
        for kind, name, _ in KINDS:
            vectors = [self._vectors(c, name) for c in chunks]
            total = sum(len(v) for v in vectors)
            templates[kind] = train_faiss(specs[kind], self.dim, _sample(vectors, total, train_size(specs[kind], total)))
            trained[kind] = _save_trained(self.out, kind, generation, templates[kind], specs[kind])
        segment = self._write_segment(generation, chunks, templates, first_id=None if keep_ids else 0)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": now(),
            "model": self.build_info["model"],
            "patches_per_image": slots,
            "patches": self.layout.describe(),
            "metric": "inner_product",
            "global_factory": specs["global"].factory,
            "global_search": specs["global"].search_params,
            "patch_factory": specs["patch"].factory,
            "patch_search": specs["patch"].search_params,
            "trained": trained,
            "trained_on": count,
            "skipped": dict(skipped),
            **{k: v for k, v in self.build_info.items() if k not in ("model", "patches", "source", "action", "base_generation")},
            "sources": [self.build_info.get("source")],
            "history": [],
            "next_id": count,
            "removed": None,
            "removed_count": 0,
            **(keep or {}),
            **manifest_extra,
        }
        manifest.update(generation=generation, segments=[segment], stored=count, count=count)
        commit(self.out, manifest)
        shutil.rmtree(self.work)
        return manifest

    def finalize_addition(self, index: Index, history_entry: dict, sources: list) -> dict:
        """Write the chunks as a new segment of `index`'s folder with new ids, filled into the folder's
        trained (empty) FAISS indexes, so adding never retrains; return the new manifest."""
        old = index.manifest
        chunks = [c for c in self.chunks() if c.count]
        added = sum(c.count for c in chunks)
        manifest = dict(old, sources=sources, history=old.get("history", []) + [history_entry])
        if added:
            generation = _next_generation(self.out)
            templates = {kind: load_trained(self.out, old, kind, self.dim) for kind, _, _ in KINDS}
            segment = self._write_segment(generation, chunks, templates, first_id=int(old["next_id"]))
            manifest.update(generation=generation, segments=old["segments"] + [segment],
                            next_id=int(old["next_id"]) + added, count=old["count"] + added,
                            stored=old.get("stored", old["count"]) + added)
        manifest["skipped"] = dict(Counter(old.get("skipped", {})) + self.skipped())
        manifest["updated"] = now()
        commit(self.out, manifest)
        shutil.rmtree(self.work)
        return manifest

    def _vectors(self, chunk: Chunk, name: str) -> np.ndarray:
        """(rows, dim) float16/32 vectors of one chunk, memory-mapped."""
        return np.load(chunk.path / f"{name}.npy", mmap_mode="r").reshape(-1, self.dim)

    def _write_segment(self, generation: int, chunks: list[Chunk], templates: dict, first_id: int | None) -> dict:
        """Write `chunks` into a new segment folder (complete before its rename) and describe it."""
        name = f"seg-{generation:06d}"
        final, tmp = self.out / name, self.out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for kind, stem, file in KINDS:
            index = fill_faiss(templates[kind], (self._vectors(c, stem) for c in chunks))
            faiss.write_index(index, str(tmp / file))
        if self.layout.mode == "salient":
            np.save(tmp / CELLS, np.concatenate([np.load(c.path / "cells.npy") for c in chunks]))
        table = _chunk_meta(chunks, first_id)
        pq.write_table(table, tmp / META, row_group_size=THUMB_GROUP)
        for file in tmp.iterdir():
            atomic.fsync(file)
        shutil.rmtree(final, ignore_errors=True)  # an uncommitted segment of a killed run
        os.replace(tmp, final)
        atomic.fsync(self.out)
        ids = table.column("id").to_numpy()
        return {"dir": name, "count": table.num_rows, "first_id": int(ids[0]), "last_id": int(ids[-1])}


def load_trained(folder: Path, manifest: dict, kind: str, dim: int) -> faiss.Index:
    """The folder's trained, empty FAISS index of `kind` (or a new exact one): where added vectors go."""
    name = (manifest.get("trained") or {}).get(kind)
    factory = manifest[f"{kind}_factory"]
    if name is None:
        if factory != "Flat":  # a build writes one for every trained factory: the manifest is damaged
            raise IndexFolderError(f"{folder / MANIFEST} names no trained {kind} index for {factory}; rebuild the index.")
        return faiss.index_factory(dim, "Flat", faiss.METRIC_INNER_PRODUCT)
    try:
        return faiss.read_index(str(folder / name))
    except RuntimeError as e:
        raise IndexFolderError(f"{folder / name} is missing or damaged ({e}); rebuild the index.") from None


def _save_trained(folder: Path, kind: str, generation: int, index: faiss.Index, spec: IndexSpec) -> str | None:
    """Keep the trained, still empty index beside the segments (its name): later additions start from it."""
    if not spec.trained:
        return None
    name = f"trained-{kind}-{generation:06d}.faiss"
    atomic.write_with(folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    return name


def commit(folder: Path, manifest: dict) -> None:
    """Make `manifest` the folder's state (one atomic rename), then delete what no manifest names."""
    atomic.write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    collect_garbage(folder, manifest)


def collect_garbage(folder: Path, manifest: dict) -> None:
    """Delete segments, trained indexes and tombstone files the manifest does not name: left by earlier
    states or by a killed run. (An app still reading an old state keeps its open files: on POSIX
    a deleted file lives on while it is open or mapped.)"""
    named = {s["dir"] for s in manifest["segments"]} | set((manifest.get("trained") or {}).values())
    named.add(manifest.get("removed"))
    for path in folder.iterdir():
        stem = path.name.split("-")[0]
        if stem in ("seg", "trained", "removed") and path.name not in named:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if "." not in named:  # a format-1 folder rewritten into segments
        for name in (GLOBAL, PATCHES, META, CELLS):
            (folder / name).unlink(missing_ok=True)


def write_tombstones(folder: Path, generation: int, ids: np.ndarray, hashes: list) -> str:
    """A new tombstone file (removed ids and their content hashes); returns its name."""
    name = f"removed-{generation:06d}.parquet"
    table = pa.table({"id": pa.array(ids, pa.int64()), "hash": pa.array(hashes, pa.string())}, schema=TOMBSTONE_SCHEMA)
    atomic.write_with(folder / name, lambda tmp: pq.write_table(table, tmp))
    return name


def _stale(folder: Path, info: dict) -> bool:
    """Whether unfinished work was started on another state of the folder than its manifest's."""
    return "base_generation" in info and info["base_generation"] != _next_generation(folder) - 1


def _next_generation(folder: Path) -> int:
    """One more than the committed manifest's (0 for a new folder): names this change's new files."""
    try:
        return int(json.loads((folder / MANIFEST).read_text()).get("generation", 0)) + 1
    except (OSError, ValueError):
        return 0


def _sample(arrays: list[np.ndarray], total: int, size: int) -> np.ndarray:
    """`size` rows drawn at random from `arrays` taken as one, read one array at a time. Which rows depends
    only on the whole, not on how it is cut into chunks: runs cut differently train the same quantisers."""
    if size <= 0:
        return np.zeros((0, arrays[0].shape[1]), np.float32)
    rows = np.sort(np.random.default_rng(0).choice(total, min(size, total), replace=False))
    picked, first = [], 0
    for array in arrays:
        mine = rows[(rows >= first) & (rows < first + len(array))] - first
        picked.append(np.asarray(array[mine], dtype=np.float32))
        first += len(array)
    return np.concatenate(picked)


def chunk_hashes(chunk: Chunk) -> list[str | None]:
    """The content hash of each image of a finished chunk, in order."""
    return pq.read_table(chunk.path / META, columns=["hash"]).column("hash").to_pylist()


def _chunk_meta(chunks: list[Chunk], first_id: int | None) -> pa.Table:
    """The chunks' metadata in order, numbered from `first_id` (None: keep the ids they carry)."""
    table = pa.concat_tables([pq.read_table(c.path / META) for c in chunks])
    if first_id is not None:  # ids follow source order, so a resumed run gets the same ids
        table = table.set_column(0, "id", pa.array(np.arange(first_id, first_id + table.num_rows), pa.int64()))
    return table


def _meta_table(meta: list[dict]) -> pa.Table:
    columns = {name: [row.get(name) for row in meta] for name in META_SCHEMA.names}
    columns["id"] = [row.get("id", -1) for row in meta]
    return pa.table(columns, schema=META_SCHEMA)


def describe(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "nothing"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _first_difference(a: dict, b: dict) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} before, {b.get(key)!r} now"
    return "none"
