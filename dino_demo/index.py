"""The index folder's format, and opening one: manifest.json, global.faiss, patches.faiss, meta.parquet.

index_writer.py writes it; a folder with a manifest is complete (the manifest is written last).
FAISS files are memory-mapped, and thumbnails are read one parquet row group at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .backbones import short_name
from .errors import UserError, first_line
from .index_types import open_faiss_file
from .patch_select import PatchLayout, layout_of

FORMAT_VERSION = 1
MANIFEST, GLOBAL, PATCHES, META = "manifest.json", "global.faiss", "patches.faiss", "meta.parquet"
CELLS = "patch_cells.npy"  # (count, slots) int16: the grid cell of each stored salient patch
BUILD_DIR = "_build"
META_SCHEMA = pa.schema([
    ("id", pa.int64()), ("source_row", pa.int64()), ("width", pa.int32()),
    ("height", pa.int32()), ("label", pa.string()), ("thumbnail", pa.binary()),
])
# Fields of the model description that must match for features to be comparable.
MODEL_KEYS = ("type", "input_size", "patch_size", "dim", "grid")


class IndexFolderError(UserError):
    """An index folder that is missing, damaged or made for another model."""


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
    manifest = read_manifest(path)
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


def read_manifest(path: Path) -> dict:
    """The manifest of a finished index folder, refused with a clear message if missing, damaged or too new."""
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
    if short_name(built["id"]) != short_name(model["id"]):
        differences.insert(0, f"model {built['id']} vs {model['id']}")
    if differences:
        raise IndexFolderError(
            f"The index at {path} was built with {built['id']}, which does not match the model in use "
            f"({'; '.join(differences)}). Start with --model {built['id']}, or rebuild the index with this model."
        )


def _open_faiss(file: Path, search_params: str) -> faiss.Index:
    if not file.is_file():
        raise IndexFolderError(f"{file} is missing; the index is incomplete, rebuild it.")
    try:
        return open_faiss_file(str(file), search_params)
    except RuntimeError as e:
        raise IndexFolderError(f"{file} is damaged ({first_line(e)}); rebuild the index.") from None


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
