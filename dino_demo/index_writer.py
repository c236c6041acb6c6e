"""Write an index folder: a build's batches as resumable chunks, then the finished folder.

A build writes its batches as chunk folders under `_build/` (each made complete before an atomic
rename), so a build killed at any moment resumes from the last chunk. `finalize` then writes each
file atomically (atomic.py), the manifest last: a folder with a manifest is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .index import BUILD_DIR, CELLS, FORMAT_VERSION, GLOBAL, MANIFEST, META, META_SCHEMA, PATCHES, IndexFolderError
from .index_types import IndexSpec, build_faiss, choose_spec, train_size
from .patch_select import layout_of, reduce_patches

THUMB_GROUP = 128  # rows per parquet row group: reading one thumbnail decodes only its group


@dataclass
class Chunk:
    """One finished piece of a build: the images of source rows [row_start, row_end)."""

    path: Path
    row_start: int
    row_end: int
    count: int
    skipped: Counter


class Writer:
    """Collects a build's batches as resumable chunks, then writes the index folder."""

    def __init__(self, out_dir: str | Path, build_info: dict):
        """`build_info` (model description, source, options) must equal a resumed build's."""
        self.out = Path(out_dir)
        self.work = self.out / BUILD_DIR
        self.work.mkdir(parents=True, exist_ok=True)
        info_path = self.work / "build.json"
        if info_path.exists():
            previous = json.loads(info_path.read_text())
            if previous != json.loads(json.dumps(build_info)):
                raise IndexFolderError(
                    f"{self.out} holds an unfinished build with other settings "
                    f"({_first_difference(previous, build_info)}). Run the same command as before "
                    f"to resume it, or delete {self.work} to start over."
                )
        else:
            atomic.write_bytes(info_path, json.dumps(build_info, indent=2).encode())
        self.build_info = build_info
        self.layout = layout_of(build_info.get("patches"))
        self.grid = tuple(build_info["model"]["grid"])
        for stale in self.work.glob("*.tmp*"):  # half-written chunk of a killed run
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()

    def chunks(self) -> list[Chunk]:
        """The finished chunks, in source order."""
        found = []
        for d in sorted(p for p in self.work.glob("chunk-*") if p.suffix == ""):
            info = json.loads((d / "info.json").read_text())
            found.append(Chunk(d, info["row_start"], info["row_end"], info["count"], Counter(info["skipped"])))
        return found

    def resume_row(self) -> int:
        """The first source row not yet covered by a finished chunk."""
        chunks = self.chunks()
        return chunks[-1].row_end if chunks else 0

    def add_chunk(
        self,
        row_start: int,
        row_end: int,
        cls: np.ndarray,  # (n, d) float32, L2-normalised
        patches: np.ndarray,  # (n, p, d) float32, L2-normalised
        meta: list[dict],  # per image: source_row, width, height, label, thumbnail
        skipped: Counter,
    ) -> None:
        """Record the images of source rows [row_start, row_end); rows not in `meta` were skipped."""
        patches, cells = reduce_patches(self.layout, cls, patches, self.grid) if len(meta) else (patches, None)
        index = len(self.chunks())
        final = self.work / f"chunk-{index:07d}"
        tmp = self.work / f"chunk-{index:07d}.tmp"
        tmp.mkdir()
        np.save(tmp / "cls.npy", cls.astype(np.float32))
        np.save(tmp / "patches.npy", patches.astype(np.float16))  # halves the scratch space
        if cells is not None:
            np.save(tmp / "cells.npy", cells)
        pq.write_table(_meta_table(meta, ids=range(len(meta))), tmp / "meta.parquet")
        info = {"row_start": row_start, "row_end": row_end, "count": len(meta), "skipped": dict(skipped)}
        (tmp / "info.json").write_text(json.dumps(info))
        for file in tmp.iterdir():  # on disk before the rename makes the chunk count: a power cut loses no chunk
            atomic.fsync(file)
        os.replace(tmp, final)
        atomic.fsync(self.work)

    def finalize(self, manifest_extra: dict, index_type: str = "auto") -> dict:
        """Assemble the chunks into the index folder and return its manifest.

        Each FAISS index is trained on a sample and filled chunk by chunk, so the exact vectors of
        a large build are never all in memory at once (the compressed index being built is).
        """
        chunks = [c for c in self.chunks() if c.count]
        skipped = sum((c.skipped for c in self.chunks()), Counter())
        count = sum(c.count for c in chunks)
        if count == 0:
            raise IndexFolderError(f"No image could be indexed (skipped: {_describe(skipped)}).")
        dim, slots = self.build_info["model"]["dim"], self.layout.slots(self.grid)
        specs = {"global": choose_spec(count, dim, "global", index_type),
                 "patch": choose_spec(count * slots, dim, "patch", index_type)}
        for name, file, kind in (("cls", GLOBAL, "global"), ("patches", PATCHES, "patch")):
            self._write_faiss(chunks, name, specs[kind], self.out / file)
        if self.layout.mode == "salient":
            cells = np.concatenate([np.load(c.path / "cells.npy") for c in chunks])
            atomic.write_with(self.out / CELLS, lambda tmp: _save_npy(tmp, cells))
        self._write_meta(chunks)
        manifest = self._manifest(count, slots, specs, skipped, manifest_extra)
        atomic.write_bytes(self.out / MANIFEST, json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.work)
        return manifest

    def _write_faiss(self, chunks: list[Chunk], name: str, spec: IndexSpec, path: Path) -> None:
        dim = self.build_info["model"]["dim"]

        def vectors(chunk: Chunk) -> np.ndarray:  # (rows, dim) float16/32, memory-mapped
            return np.load(chunk.path / f"{name}.npy", mmap_mode="r").reshape(-1, dim)

        total = sum(len(vectors(c)) for c in chunks)
        sample = _sample([vectors(c) for c in chunks], total, train_size(spec, total))
        index = build_faiss(spec, dim, sample, lambda: (vectors(c) for c in chunks))
        atomic.write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))

    def _write_meta(self, chunks: list[Chunk]) -> None:
        tables, next_id = [], 0
        for chunk in chunks:  # ids follow source order, so a resumed build gets the same ids
            table = pq.read_table(chunk.path / "meta.parquet")
            ids = pa.array(np.arange(next_id, next_id + table.num_rows), pa.int64())
            tables.append(table.set_column(0, "id", ids))
            next_id += table.num_rows
        table = pa.concat_tables(tables)
        atomic.write_with(self.out / META, lambda tmp: pq.write_table(table, tmp, row_group_size=THUMB_GROUP))

    def _manifest(self, count: int, slots: int, specs: dict, skipped: Counter, extra: dict) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": self.build_info["model"],
            "count": count,
            "patches_per_image": slots,
            "patches": self.layout.describe(),
            "metric": "inner_product",
            "global_factory": specs["global"].factory,
            "global_search": specs["global"].search_params,
            "patch_factory": specs["patch"].factory,
            "patch_search": specs["patch"].search_params,
            "skipped": dict(skipped),
            **{k: v for k, v in self.build_info.items() if k not in ("model", "patches")},
            **extra,
        }


def _sample(arrays: list[np.ndarray], total: int, size: int) -> np.ndarray:
    """About `size` rows drawn evenly at random from `arrays`, read one array at a time."""
    if size <= 0:
        return np.zeros((0, arrays[0].shape[1]), np.float32)
    rng, picked = np.random.default_rng(0), []
    for array in arrays:
        take = min(len(array), int(round(size * len(array) / total)))
        rows = np.sort(rng.choice(len(array), take, replace=False))
        picked.append(np.asarray(array[rows], dtype=np.float32))
    return np.concatenate(picked)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would add ".npy" to the temporary name
        np.save(f, array)


def _meta_table(meta: list[dict], ids) -> pa.Table:
    columns = {"id": list(ids)}
    for name in META_SCHEMA.names[1:]:
        columns[name] = [row.get(name) for row in meta]
    return pa.table(columns, schema=META_SCHEMA)


def _describe(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "nothing"


def _first_difference(a: dict, b: dict) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} before, {b.get(key)!r} now"
    return "none"
