"""The index folder: manifest.json, global.faiss, patches.faiss and meta.parquet.

A build writes its batches as chunk folders under `_build/` (each made complete before an atomic
rename), so a build killed at any moment resumes from the last chunk. `finalize` then writes each
file through temp + rename, the manifest last: a folder with a manifest is complete.
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

from .errors import UserError
from .index_types import IndexSpec, build_faiss, choose_spec, open_faiss_file, train_size
from .patch_select import PatchLayout, layout_of, reduce_patches

FORMAT_VERSION = 1
MANIFEST, GLOBAL, PATCHES, META = "manifest.json", "global.faiss", "patches.faiss", "meta.parquet"
CELLS = "patch_cells.npy"  # (count, slots) int16: the grid cell of each stored salient patch
BUILD_DIR = "_build"
THUMB_GROUP = 128  # rows per parquet row group: reading one thumbnail decodes only its group
META_SCHEMA = pa.schema([
    ("id", pa.int64()), ("source_row", pa.int64()), ("width", pa.int32()),
    ("height", pa.int32()), ("label", pa.string()), ("thumbnail", pa.binary()),
])
# Fields of the model description that must match for features to be comparable.
MODEL_KEYS = ("type", "input_size", "patch_size", "dim", "grid")


class IndexFolderError(UserError):
    """An index folder that is missing, damaged or made for another model."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    _fsync(tmp)
    os.replace(tmp, path)


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
            write_atomic(info_path, json.dumps(build_info, indent=2).encode())
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
            _fsync(file)
        os.replace(tmp, final)
        _fsync(self.work)

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
            _write_npy(np.concatenate([np.load(c.path / "cells.npy") for c in chunks]), self.out / CELLS)
        self._write_meta(chunks)
        manifest = self._manifest(count, slots, specs, skipped, manifest_extra)
        write_atomic(self.out / MANIFEST, json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.work)
        return manifest

    def _write_faiss(self, chunks: list[Chunk], name: str, spec: IndexSpec, path: Path) -> None:
        dim = self.build_info["model"]["dim"]

        def vectors(chunk: Chunk) -> np.ndarray:  # (rows, dim) float16/32, memory-mapped
            return np.load(chunk.path / f"{name}.npy", mmap_mode="r").reshape(-1, dim)

        total = sum(len(vectors(c)) for c in chunks)
        sample = _sample([vectors(c) for c in chunks], total, train_size(spec, total))
        index = build_faiss(spec, dim, sample, lambda: (vectors(c) for c in chunks))
        _write_index(index, path)

    def _write_meta(self, chunks: list[Chunk]) -> None:
        tables, next_id = [], 0
        for chunk in chunks:  # ids follow source order, so a resumed build gets the same ids
            table = pq.read_table(chunk.path / "meta.parquet")
            ids = pa.array(np.arange(next_id, next_id + table.num_rows), pa.int64())
            tables.append(table.set_column(0, "id", ids))
            next_id += table.num_rows
        tmp_meta = self.out / f".{META}.tmp"
        pq.write_table(pa.concat_tables(tables), tmp_meta, row_group_size=THUMB_GROUP)
        _fsync(tmp_meta)
        os.replace(tmp_meta, self.out / META)

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


def _write_npy(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    _fsync(tmp)
    os.replace(tmp, path)


def _write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename after it never exposes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


@dataclass
class Index:
    """An opened index folder; the FAISS files are memory-mapped, not read into RAM."""

    path: Path
    manifest: dict
    global_index: faiss.Index
    patch_index: faiss.Index
    meta: pa.Table  # every column but the thumbnails, which are read one row group at a time
    thumbnails: pq.ParquetFile
    patch_cells: np.ndarray | None = None  # (count, slots) int16, memory-mapped; salient layout only

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def patches_per_image(self) -> int:
        return int(self.manifest["patches_per_image"])

    @property
    def layout(self) -> PatchLayout:
        return layout_of(self.manifest.get("patches"))

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["model"]["grid"])

    def row(self, image_id: int) -> dict:
        """Metadata of one image: id, source_row, width, height, label, thumbnail (JPEG bytes)."""
        row = {name: self.meta.column(name)[image_id].as_py() for name in self.meta.column_names}
        group, offset = divmod(image_id, self.thumbnails.metadata.row_group(0).num_rows)
        row["thumbnail"] = self.thumbnails.read_row_group(group, ["thumbnail"]).column(0)[offset].as_py()
        return row

    def size(self, image_id: int) -> tuple[int, int]:
        return int(self.meta.column("width")[image_id].as_py()), int(self.meta.column("height")[image_id].as_py())


def load_index(path: str | Path, model: dict | None = None) -> Index:
    """Open an index folder, refusing one that is incomplete, damaged or made for another model."""
    path = Path(path)
    manifest = _read_manifest(path)
    if model is not None:
        check_model(manifest, model, path)
    meta, thumbnails = _open_meta(path / META)
    global_index = _open_faiss(path / GLOBAL, manifest.get("global_search", ""))
    patch_index = _open_faiss(path / PATCHES, manifest.get("patch_search", ""))
    count, per_image, dim = manifest["count"], manifest["patches_per_image"], manifest["model"]["dim"]
    for name, index, expected in ((GLOBAL, global_index, count), (PATCHES, patch_index, count * per_image)):
        if index.ntotal != expected or index.d != dim:
            raise IndexFolderError(
                f"{path / name} holds {index.ntotal} vectors of {index.d} dims, but the manifest "
                f"says {expected} of {dim}; the index is damaged, rebuild it."
            )
    if meta.num_rows != count:
        raise IndexFolderError(f"{path / META} has {meta.num_rows} rows for {count} images; rebuild the index.")
    cells = _open_cells(path / CELLS, (count, per_image)) if layout_of(manifest.get("patches")).mode == "salient" else None
    return Index(path, manifest, global_index, patch_index, meta, thumbnails, cells)


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise IndexFolderError(f"No index folder at {path}. Build one with `python -m index_builder --out {path} ...`.")
    file = path / MANIFEST
    if not file.is_file():
        hint = " An unfinished build is there: rerun its command to finish it." if (path / BUILD_DIR).exists() else ""
        raise IndexFolderError(f"{file} is missing, so {path} is not a finished index.{hint}")
    try:
        manifest = json.loads(file.read_text())
        version = manifest["format_version"]
        manifest["count"], manifest["patches_per_image"], manifest["model"]["dim"]
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFolderError(f"{file} is damaged ({type(e).__name__}: {e}); rebuild the index.") from None
    if version != FORMAT_VERSION:
        raise IndexFolderError(
            f"{file} is index format {version}; this version reads format {FORMAT_VERSION}. Rebuild the index."
        )
    return manifest


def check_model(manifest: dict, model: dict, path: Path) -> None:
    """Refuse an index built with another model: its vectors mean nothing to this one."""
    built = manifest["model"]
    differences = [f"{k} {built.get(k)} vs {model.get(k)}" for k in MODEL_KEYS if built.get(k) != model.get(k)]
    if _model_name(built["id"]) != _model_name(model["id"]):
        differences.insert(0, f"model {built['id']} vs {model['id']}")
    if differences:
        raise IndexFolderError(
            f"The index at {path} was built with {built['id']}, which does not match the model in use "
            f"({'; '.join(differences)}). Start with --model {built['id']}, or rebuild the index with this model."
        )


def _model_name(model_id: str) -> str:
    """'facebook/dino-vits16' and a local folder '.../dino-vits16' name the same model."""
    return Path(str(model_id).rstrip("/")).name


def _open_faiss(file: Path, search_params: str) -> faiss.Index:
    if not file.is_file():
        raise IndexFolderError(f"{file} is missing; the index is incomplete, rebuild it.")
    try:
        return open_faiss_file(str(file), search_params)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unreadable"
        raise IndexFolderError(f"{file} is damaged ({reason}); rebuild the index.") from None


def _open_meta(file: Path) -> tuple[pa.Table, pq.ParquetFile]:
    """The small columns in RAM; thumbnails stay in the file (5M of them would not fit in 16 GB)."""
    if not file.is_file():
        raise IndexFolderError(f"{file} is missing; the index is incomplete, rebuild it.")
    try:
        parquet = pq.ParquetFile(file, memory_map=True)
        table = parquet.read(columns=[n for n in META_SCHEMA.names if n != "thumbnail"])
    except (OSError, pa.ArrowException) as e:
        raise IndexFolderError(f"{file} is damaged ({e}); rebuild the index.") from None
    if parquet.schema_arrow.names != META_SCHEMA.names:
        raise IndexFolderError(f"{file} has columns {parquet.schema_arrow.names}, expected {META_SCHEMA.names}; rebuild.")
    return table, parquet


def _open_cells(file: Path, shape: tuple[int, int]) -> np.ndarray:
    if not file.is_file():
        raise IndexFolderError(f"{file} is missing; the index is incomplete, rebuild it.")
    try:
        cells = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise IndexFolderError(f"{file} is damaged ({e}); rebuild the index.") from None
    if cells.shape != shape:
        raise IndexFolderError(f"{file} has shape {cells.shape}, expected {shape}; rebuild the index.")
    return cells
