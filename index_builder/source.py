"""Where the images come from: a Hugging Face `datasets` collection by hub id, local folder or parquet.

Rows come out undecoded (image bytes or a path) so decoding can run in worker processes, and
numbered by their position in the split, which is what makes an interrupted build resumable.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    return Source(data, image_column, label_column, num_rows, label_names, location, split, revision)


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
