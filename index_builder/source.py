"""Where the images come from: a Hugging Face `datasets` collection by hub id, local folder or parquet.

Rows come out undecoded (image bytes or a path) so decoding can run in worker processes, and
numbered by their position in the split, which is what makes an interrupted build resumable.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from dino_demo.errors import HubUnreachable, UserError, first_line
from dino_demo.hub import hub_reachable

LABEL_CANDIDATES = ("label", "labels", "caption", "text", "class", "name", "title")


class SourceError(UserError):
    """The dataset cannot be opened or lacks the columns asked for."""


@dataclass
class Row:
    """One dataset row: its position in the split, the undecoded image and an optional label."""

    index: int
    image: Any  # {"bytes": ..., "path": ...}, a path, a PIL image, or None when the cell is empty
    label: str | None


@dataclass(frozen=True)
class SourceSpec:
    """How to open a source: plain values, so a worker on another machine can open the same rows."""

    dataset: str
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    revision: str | None = None

    def open(self) -> "Source":
        return open_source(self.dataset, self.split, self.image_column, self.label_column, self.streaming,
                           self.revision)


@dataclass(frozen=True)
class Shard:
    """A part of the collection one worker reads on its own: `datasets`' shard `index` of `count`,
    holding source rows [first_row, end_row)."""

    index: int
    count: int
    first_row: int
    end_row: int
    cut: int  # a prepared dataset's rows [0, cut) were cut into `count` shards (0 for a stream)


@dataclass
class Source:
    dataset: Any  # datasets.Dataset or datasets.IterableDataset
    image_column: str
    label_column: str | None
    num_rows: int | None  # None when streaming and unknown
    label_names: list[str] | None  # ClassLabel names, to store words rather than numbers
    location: str = ""  # hub id as given, or the local path made absolute
    split: str = "train"
    revision: str | None = None  # hub revision asked for (a branch, tag or commit), if any
    spec: SourceSpec | None = None  # how to open it again elsewhere (None: made by hand, local builds only)

    def rows(self, start: int = 0, limit: int | None = None) -> Iterator[Row]:
        """Rows from position `start` up to position `limit` (exclusive), in order."""
        stop = self.num_rows if limit is None else min(limit, self.num_rows or limit)
        if stop is not None and start >= stop:
            return
        data = self.dataset.skip(start) if start else self.dataset
        for index, record in enumerate(data, start):
            if stop is not None and index >= stop:
                return
            yield Row(index, record.get(self.image_column), self._label(record))

    def shards(self, stop: int | None, rows_per_shard: int, sizes: Iterable[int] = ()) -> list[Shard]:
        """Rows [0, stop) as `datasets` shards: contiguous pieces of about `rows_per_shard` rows of a
        prepared dataset, or a stream's own shards (its files) placed by their `sizes` in rows."""
        if self.num_rows is not None:
            stop = self.num_rows if stop is None else min(stop, self.num_rows)
            count = max(1, -(-stop // rows_per_shard))
            return [Shard(i, count, *_contiguous(stop, count, i), stop) for i in range(count)]
        shards, first = [], 0
        for i, rows in enumerate(sizes):
            if stop is not None and first >= stop:
                break
            end = first + rows if stop is None else min(first + rows, stop)
            shards.append(Shard(i, self.dataset.n_shards, first, end, 0))
            first += rows
        return shards

    def stream_shards(self) -> int:
        """How many shards (files) a stream has: each can be read, and counted, on its own."""
        return self.dataset.n_shards

    def count_stream_shard(self, index: int) -> int:
        """Rows in shard `index` of a stream (read through once, images left undecoded)."""
        return sum(1 for _ in self.dataset.shard(self.dataset.n_shards, index, contiguous=True))

    def shard_rows(self, shard: Shard, start: int, stop: int) -> Iterator[Row]:
        """Rows [start, stop) of `shard`, read from that shard alone: a worker never reads the rows
        of the shards before it."""
        if self.num_rows is not None:
            data = self.dataset.select(range(shard.cut)) if shard.cut < self.num_rows else self.dataset
            part = data.shard(shard.count, shard.index, contiguous=True)
            part = part.select(range(start - shard.first_row, stop - shard.first_row))
        else:  # a stream's shard is one file: rows before `start` in it are read past, no others
            part = self.dataset.shard(shard.count, shard.index, contiguous=True).skip(start - shard.first_row)
        for index, record in zip(range(start, stop), part):
            yield Row(index, record.get(self.image_column), self._label(record))

    def _label(self, record: dict) -> str | None:
        if self.label_column is None:
            return None
        value = record.get(self.label_column)
        if value is None:
            return None
        if self.label_names is not None and isinstance(value, int) and 0 <= value < len(self.label_names):
            return self.label_names[value]
        return str(value)

    def describe(self) -> dict:
        """Where the rows come from, as the manifest records it: resuming or adding compares these."""
        return {"dataset": self.location, "split": self.split, "revision": self.revision,
                "image_column": self.image_column, "label_column": self.label_column}


def open_source(
    dataset: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    revision: str | None = None,
) -> Source:
    """Open `dataset` (hub id 'org/name', a local folder, or a .parquet file / glob) lazily."""
    import datasets

    datasets.logging.set_verbosity_error()
    data = _load(dataset, split, streaming, revision)
    if data.features is None:  # some streaming sources only know their columns after a first row
        data = data._resolve_features()
    features = data.features
    image_column = image_column or _find_image_column(features, dataset)
    if image_column not in features:
        raise SourceError(f"{dataset} has no column '{image_column}'; its columns are {list(features)}.")
    if label_column is None:
        label_column = next((c for c in LABEL_CANDIDATES if c in features and c != image_column), None)
    elif label_column not in features:
        raise SourceError(f"{dataset} has no column '{label_column}'; its columns are {list(features)}.")
    if isinstance(features[image_column], datasets.Image):
        data = data.cast_column(image_column, datasets.Image(decode=False))  # decode in workers
    label_names = None
    if label_column and isinstance(features[label_column], datasets.ClassLabel):
        label_names = list(features[label_column].names)
    num_rows = None if streaming else len(data)
    local = Path(dataset).expanduser()
    location = str(local.resolve()) if local.exists() else dataset
    where = str(local.absolute()) if dataset.endswith(".parquet") and not local.exists() else location  # a glob
    spec = SourceSpec(where, split, image_column, label_column, streaming, revision)
    return Source(data, image_column, label_column, num_rows, label_names, location, split, revision, spec)


def _contiguous(rows: int, count: int, index: int) -> tuple[int, int]:
    """The rows of shard `index` of `count` as `Dataset.shard(contiguous=True)` cuts `rows` rows."""
    size, extra = divmod(rows, count)
    first = index * size + min(index, extra)
    return first, first + size + (index < extra)


def _load(dataset: str, split: str, streaming: bool, revision: str | None = None):
    import datasets

    path = Path(dataset).expanduser()
    is_parquet = dataset.endswith(".parquet")
    if path.exists() or is_parquet:
        args = ("parquet",) if is_parquet else (str(path),)
        kwargs = {"data_files": {split: str(path)}} if is_parquet else {}
    else:
        if dataset.count("/") != 1 or dataset.startswith((".", "/", "~")):
            raise SourceError(
                f"{dataset} is neither a local folder or .parquet file nor a hub id like 'org/name'."
            )
        args, kwargs = (dataset,), {"revision": revision} if revision else {}
        if not hub_reachable():
            try:  # a cached copy needs no network
                with _offline():
                    return datasets.load_dataset(dataset, split=split, streaming=streaming, **kwargs)
            except Exception:
                raise HubUnreachable(
                    f"Cannot reach the Hugging Face Hub to download dataset '{dataset}'; download it "
                    f"where there is internet (`hf download --repo-type dataset {dataset} --local-dir "
                    f"data/{dataset.split('/')[-1]}`) and pass that folder as --dataset."
                ) from None
    try:
        return datasets.load_dataset(*args, split=split, streaming=streaming, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower():
            raise SourceError(f"{dataset} has no split '{split}' ({first_line(e)}); pass --split.") from None
        raise SourceError(f"Cannot open {dataset}: {first_line(e)}") from None
    except (OSError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise SourceError(f"Cannot open {dataset}: {first_line(e)}") from None


@contextmanager
def _offline():
    """Make `datasets` use only its cache, without the hub clients' half-minute of retries."""
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _find_image_column(features, dataset: str) -> str:
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "image_path", "path", "file_name"):
        if name in features:
            return name
    raise SourceError(f"{dataset} has no image column among {list(features)}; pass --image-column.")
