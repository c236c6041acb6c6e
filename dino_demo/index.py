"""The index folder's format, and opening one.

A folder holds `manifest.json` and the files it names: segments (`seg-NNNNNN/`: global.faiss,
patches.faiss, meta.parquet, patch_cells.npy), each written once and never changed, the trained
but empty FAISS indexes that new segments start from, and a tombstone file of removed images.
index_writer.py and index_update.py write it; a folder changes only by writing new files and
then replacing the manifest, so an open folder is always one whole state (the manifest's).
Image ids are stable: a removed image's id is never reused, and ids survive `compact`.
FAISS files are memory-mapped, and thumbnails are read one parquet row group at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .backbones import short_name
from .errors import UserError, first_line
from .index_types import open_faiss_file
from .patch_select import PatchLayout, layout_of

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
GLOBAL, PATCHES, META = "global.faiss", "patches.faiss", "meta.parquet"  # in each segment folder
CELLS = "patch_cells.npy"  # (count, slots) int16: the grid cell of each stored salient patch
BUILD_DIR = "_build"
META_SCHEMA = pa.schema([
    ("id", pa.int64()), ("source_row", pa.int64()), ("width", pa.int32()),
    ("height", pa.int32()), ("label", pa.string()), ("thumbnail", pa.binary()),
    ("source", pa.int32()),  # which of the manifest's sources the image came from
    ("hash", pa.string()),  # of a JPEG's image data, or the pixels: an exact copy is not added twice
])
V1_NAMES = META_SCHEMA.names[:6]  # format 1: one segment at the top of the folder, no source or hash
TOMBSTONE_SCHEMA = pa.schema([("id", pa.int64()), ("hash", pa.string())])
# Fields of the model description that must match for features to be comparable.
MODEL_KEYS = ("type", "input_size", "patch_size", "dim", "grid")


class IndexFolderError(UserError):
    """An index folder that is missing, damaged or made for another model."""


class NoSuchImage(UserError):
    """An image id that is not in the index (never added, or removed)."""


@dataclass
class Segment:
    """Images written together (a build, an add or a compaction); never changed once written."""

    path: Path
    ids: np.ndarray  # (n,) int64, ascending: the images' ids
    global_index: faiss.Index
    patch_index: faiss.Index
    meta: pa.Table  # every column but the thumbnails, which are read one row group at a time
    thumbnails: pq.ParquetFile
    cells: np.ndarray | None  # (n, slots) int16, memory-mapped; salient layout only


class Vectors:
    """One kind of vector (image or patch) over every segment, searched like one FAISS index: ids
    are image id * per_image + slot, and a removed image's vectors are never returned."""

    def __init__(self, parts: list[faiss.Index], segment_ids: list[np.ndarray], per_image: int, removed: np.ndarray):
        self.parts, self.segment_ids, self.per_image, self.removed = parts, segment_ids, per_image, removed
        # Removed vectors in each part: how many extra hits a search may need to still return k live ones.
        self._dead = [int(np.isin(ids, removed).sum()) * per_image for ids in segment_ids]

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.parts)

    @property
    def d(self) -> int:
        return self.parts[0].d

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (len(x), k), best first; -1 where fewer than k live vectors exist."""
        found = [self._search_part(j, x, k) for j in range(len(self.parts))]
        scores = np.concatenate([s for s, _ in found], axis=1)
        ids = np.concatenate([i for _, i in found], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _search_part(self, j: int, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        part, dead = self.parts[j], self._dead[j]
        most = min(part.ntotal, k + dead)  # enough to hold k live hits whatever was removed
        fetch = min(most, k + min(dead, k))
        while True:
            scores, local = part.search(np.ascontiguousarray(x, dtype=np.float32), max(fetch, 1))
            ids = self._global(j, local)
            live = ids >= 0
            if dead:
                live &= ~np.isin(ids // self.per_image, self.removed)
            if fetch >= most or (live.sum(axis=1) >= k).all():
                break
            fetch = min(most, 4 * fetch)  # many removed images near this query: look further
        return np.where(live, scores, -np.inf).astype(np.float32), np.where(live, ids, -1)

    def _global(self, j: int, local: np.ndarray) -> np.ndarray:
        image, slot = np.divmod(np.maximum(local, 0), self.per_image)
        return np.where(local >= 0, self.segment_ids[j][image] * self.per_image + slot, -1)


@dataclass
class Index:
    """An opened index folder: its segments searched as one, removed images left out."""

    path: Path
    manifest: dict
    segments: list[Segment]
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted ids
    removed_hashes: frozenset = frozenset()

    def __post_init__(self):
        self.ids = np.concatenate([s.ids for s in self.segments])  # every stored id, ascending
        self._starts = np.cumsum([0] + [len(s.ids) for s in self.segments])
        self._live = ~np.isin(self.ids, self.removed)
        per_image = self.patches_per_image
        self.global_index = Vectors([s.global_index for s in self.segments], [s.ids for s in self.segments], 1, self.removed)
        self.patch_index = Vectors([s.patch_index for s in self.segments], [s.ids for s in self.segments],
                                   per_image, self.removed)

    @property
    def count(self) -> int:
        """Images that can be found (removed ones are not counted)."""
        return int(self._live.sum())

    @property
    def patches_per_image(self) -> int:
        return int(self.manifest["patches_per_image"])

    @property
    def layout(self) -> PatchLayout:
        return layout_of(self.manifest.get("patches"))

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["model"]["grid"])

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))

    def live_ids(self) -> np.ndarray:
        return self.ids[self._live]

    @cached_property
    def meta(self) -> pa.Table:
        """Metadata of every image that can be found, by id (no thumbnails)."""
        table = pa.concat_tables([s.meta for s in self.segments])
        return table.filter(pa.array(self._live)) if not self._live.all() else table

    def has(self, image_id) -> bool:
        return self._position(image_id) is not None

    def _position(self, image_id) -> int | None:
        """Where a live image lies among the stored ids; None if it is not one (or not an id at all)."""
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            return None
        pos = int(np.searchsorted(self.ids, image_id))
        return pos if pos < len(self.ids) and self.ids[pos] == image_id and self._live[pos] else None

    def _locate(self, image_id) -> tuple[Segment, int]:
        """The segment holding a live image and its row there; NoSuchImage for any other id."""
        pos = self._position(image_id)
        if pos is None:
            raise NoSuchImage(f"There is no image {image_id} in this index (never added, or removed).")
        j = int(np.searchsorted(self._starts, pos, side="right")) - 1
        return self.segments[j], pos - int(self._starts[j])

    def row(self, image_id: int) -> dict:
        """Metadata of one image: id, source_row, width, height, label, thumbnail (JPEG bytes), source, hash."""
        return self.rows([image_id])[0]

    def rows(self, image_ids) -> list[dict]:
        """`row` of each image, in order; each parquet row group of thumbnails is read once for all of them."""
        located = [self._locate(i) for i in image_ids]
        groups: dict[tuple[int, int], pa.ChunkedArray] = {}  # (segment, row group) -> its thumbnails, read on first need
        rows = []
        for segment, local in located:
            row = {name: segment.meta.column(name)[local].as_py() for name in segment.meta.column_names}
            group, offset = divmod(local, segment.thumbnails.metadata.row_group(0).num_rows)
            key = (id(segment), group)
            if key not in groups:
                groups[key] = segment.thumbnails.read_row_group(group, ["thumbnail"]).column(0)
            row["thumbnail"] = groups[key][offset].as_py()
            rows.append(row)
        return rows

    def size(self, image_id: int) -> tuple[int, int]:
        segment, local = self._locate(image_id)
        return int(segment.meta.column("width")[local].as_py()), int(segment.meta.column("height")[local].as_py())

    def vector(self, image_id: int) -> np.ndarray:
        """(d,) the stored global vector of one image."""
        segment, local = self._locate(image_id)
        return segment.global_index.reconstruct(local)

    def vectors(self, ids=None) -> np.ndarray:
        """(n, d) stored global vectors of `ids` (every image that can be found, by default)."""
        ids = self.live_ids() if ids is None else ids
        return self._read(ids, "global_index", 1)

    def image_patches(self, image_id: int) -> np.ndarray:
        """(slots, d) the stored patch vectors of one image (from 8-bit codes in a compressed index)."""
        return self.patches_of([image_id])[0]

    def patches_of(self, image_ids) -> np.ndarray:
        """(n, slots, d) stored patch vectors of several images."""
        per_image = self.patches_per_image
        return self._read(image_ids, "patch_index", per_image).reshape(len(image_ids), per_image, self.global_index.d)

    def _read(self, image_ids, kind: str, per_image: int) -> np.ndarray:
        """(n * per_image, d) stored vectors of images, read with one reconstruct_batch call per segment."""
        positions = [self._locate(i) for i in image_ids]
        out = np.empty((len(positions), per_image, self.global_index.d), np.float32)
        for segment in {id(s): s for s, _ in positions}.values():
            rows = [j for j, (s, _) in enumerate(positions) if s is segment]
            keys = (np.array([positions[j][1] for j in rows])[:, None] * per_image + np.arange(per_image)).ravel()
            out[rows] = getattr(segment, kind).reconstruct_batch(keys.astype(np.int64)).reshape(len(rows), per_image, -1)
        return out.reshape(len(positions) * per_image, self.global_index.d)

    def cells(self, image_id: int) -> np.ndarray | None:
        """(slots,) grid cell of each stored salient patch; None for the other layouts."""
        segment, local = self._locate(image_id)
        return None if segment.cells is None else segment.cells[local]

    def source_rows(self) -> dict[int, int]:
        """Image id -> its row in its source, for every image that can be found."""
        meta = self.meta
        return dict(zip(meta.column("id").to_pylist(), meta.column("source_row").to_pylist()))

    def hashes(self) -> set[str]:
        """Content hashes of every stored image and of every removed one (which must not come back)."""
        found = set(self.removed_hashes)
        for s in self.segments:
            if "hash" in s.meta.column_names:
                found.update(h for h in s.meta.column("hash").to_pylist() if h)
        return found


def load_index(path: str | Path, model: dict | None = None) -> Index:
    """Open an index folder, refusing one that is incomplete, damaged or made for another model."""
    path = Path(path)
    manifest = read_manifest(path)
    if model is not None:
        check_model(manifest, model, path)
    per_image, dim = manifest["patches_per_image"], manifest["model"]["dim"]
    salient = layout_of(manifest.get("patches")).mode == "salient"
    segments = [_open_segment(path / s["dir"], s["count"], per_image, dim, salient, manifest)
                for s in manifest["segments"]]
    removed, hashes = _open_tombstones(path, manifest.get("removed"))
    stored = sum(len(s.ids) for s in segments)
    if not segments or stored != manifest.get("stored", stored):
        raise IndexFolderError(f"{path / MANIFEST} lists {stored} stored images, not {manifest.get('stored')}; rebuild.")
    return Index(path, manifest, segments, removed, hashes)


def read_manifest(path: Path) -> dict:
    """The manifest of a finished index folder (format 1 read as one segment), refused with a clear
    message if missing, damaged or too new."""
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
        if version == 1:
            manifest.setdefault("segments", [{"dir": ".", "count": manifest["count"]}])
        [(s["dir"], s["count"]) for s in manifest["segments"]]
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFolderError(f"{file} is damaged ({type(e).__name__}: {e}); rebuild the index.") from None
    if version not in (1, FORMAT_VERSION):
        raise IndexFolderError(
            f"{file} is index format {version}; this version reads formats 1 and {FORMAT_VERSION}. Rebuild the index."
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


def _open_segment(folder: Path, count: int, per_image: int, dim: int, salient: bool, manifest: dict) -> Segment:
    meta, thumbnails = _open_meta(folder / META)
    global_index = _open_faiss(folder / GLOBAL, manifest.get("global_search", ""))
    patch_index = _open_faiss(folder / PATCHES, manifest.get("patch_search", ""))
    for name, index, expected in ((GLOBAL, global_index, count), (PATCHES, patch_index, count * per_image)):
        if index.ntotal != expected or index.d != dim:
            raise IndexFolderError(
                f"{folder / name} holds {index.ntotal} vectors of {index.d} dims, but the manifest "
                f"says {expected} of {dim}; the index is damaged, rebuild it."
            )
    if meta.num_rows != count:
        raise IndexFolderError(f"{folder / META} has {meta.num_rows} rows for {count} images; rebuild the index.")
    ids = meta.column("id").to_numpy().astype(np.int64)
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise IndexFolderError(f"{folder / META} has ids out of order; rebuild the index.")
    cells = _open_cells(folder / CELLS, (count, per_image)) if salient else None
    return Segment(folder, ids, global_index, patch_index, meta, thumbnails, cells)


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
        names = parquet.schema_arrow.names
        table = parquet.read(columns=[n for n in names if n != "thumbnail"])
    except (OSError, pa.ArrowException) as e:
        raise IndexFolderError(f"{file} is damaged ({e}); rebuild the index.") from None
    if names not in (META_SCHEMA.names, V1_NAMES):
        raise IndexFolderError(f"{file} has columns {names}, expected {META_SCHEMA.names}; rebuild.")
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


def _open_tombstones(path: Path, name: str | None) -> tuple[np.ndarray, frozenset]:
    """Removed ids (sorted) and their content hashes; none before the first removal. A rebuild keeps
    the hashes with id -1, so that removed images stay out of the new index."""
    if not name:
        return np.zeros(0, np.int64), frozenset()
    file = path / name
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise IndexFolderError(f"{file} is missing or damaged ({first_line(e)}); rebuild the index.") from None
    ids = table.column("id").to_numpy().astype(np.int64)
    return np.sort(ids[ids >= 0]), frozenset(h for h in table.column("hash").to_pylist() if h)
