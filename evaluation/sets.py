"""Query sets for `python -m evaluation`: the queries of a protocol and how to score them.

Rankings reach `score` as the *source rows* of the hits (`meta.parquet`'s source_row), so one
set scores any index built from the same collection, exact or compressed.
"""
from __future__ import annotations

import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from dino_demo.geometry import Box
from dino_demo.images import load_image
from dino_demo.index import Index
from index_builder.source import SourceError, open_source

from dino_demo.copies import TRANSFORMS, make_copies
from .metrics import RevisitedTruth, Summary, revisited_map, summarise

PRECISION_KS = (1, 5, 10)


@dataclass
class Query:
    """One query: where its image comes from, the box region search uses, and its truth."""

    source: object  # anything `load_image` reads, or a function making the image (copies)
    box: Box | None = None  # None: the centre box (the middle half of each side)
    group: str = "all"  # copies: the transform that made it
    row: int | None = None  # its own source row in the indexed collection, if it has one
    truth: object = None  # RevisitedTruth, the original's source row, or a label


@dataclass
class EvalSet:
    """A protocol's queries, in order, and how to score their rankings on one index."""

    protocol: str
    queries: list[Query]
    box_note: str  # how region-search boxes were chosen, for the report
    score: Callable[[Index, list[list[int]]], dict[str, Summary]]
    notes: list[str] = field(default_factory=list)

    def images(self) -> Iterator[Image.Image]:
        for query in self.queries:  # one at a time: a large query set never sits in memory
            yield load_image(query.source() if callable(query.source) else query.source)


def centre_box(size: tuple[int, int]) -> Box:
    """The middle half of each side: the region search of queries that come without a box."""
    w, h = size
    return Box(w / 4, h / 4, 3 * w / 4, 3 * h / 4)


# --- revisited Oxford / Paris ---------------------------------------------------------------------

def load_revisited(location: str, split: str, database: str | None, limit: int | None) -> EvalSet:
    """ROxford5k / RParis6k ground truth: a folder with gnd_*.pkl and jpg/, or a datasets collection
    whose rows hold image, bbx, easy, hard and junk, indices being rows of the indexed collection."""
    folder = Path(location).expanduser()
    if folder.is_dir() and list(folder.glob("gnd_*.pkl")):
        queries, item_of_row = _revisited_files(folder, database)
    else:
        queries, item_of_row = _revisited_collection(location, split), None
    queries, notes = queries[:limit], []
    if item_of_row is not None:
        notes.append(f"{len(set(item_of_row.values()))} images of the ground truth's database found; images "
                     "not in its imlist (such as its query images) are left out of the rankings.")

    def score(index: Index, rankings: list[list[int]]) -> dict[str, Summary]:
        if item_of_row is not None:  # rows outside the protocol's database (its queries) drop out
            rankings = [[item_of_row[r] for r in ranking if r in item_of_row] for ranking in rankings]
        return revisited_map(rankings, [q.truth for q in queries])

    return EvalSet("revisited", queries, "the ground truth's query box (bbx)", score, notes)


def _revisited_files(folder: Path, database: str | None) -> tuple[list[Query], dict[int, int]]:
    gnd_file = sorted(folder.glob("gnd_*.pkl"))[0]
    with open(gnd_file, "rb") as f:
        cfg = pickle.load(f)
    images = folder / "jpg"
    queries = [
        Query(images / f"{name}.jpg", box=_box(g.get("bbx")), truth=_truth(g))
        for name, g in zip(cfg["qimlist"], cfg["gnd"], strict=True)
    ]
    position = {name: i for i, name in enumerate(cfg["imlist"])}
    source = open_source(database or str(images))
    item_of_row = {}
    for row in source.rows():
        path = row.image.get("path") if isinstance(row.image, dict) else row.image
        if not isinstance(path, str):
            raise SourceError(f"{database or images} gives no file names; "
                              "pass --database, the image folder the index was built from.")
        if Path(path).stem in position:
            item_of_row[row.index] = position[Path(path).stem]
    if not item_of_row:
        raise SourceError(f"No image of {database or images} is in {gnd_file.name}'s imlist; "
                          "pass --database, the folder the index was built from.")
    return queries, item_of_row


def _revisited_collection(location: str, split: str) -> list[Query]:
    source = open_source(location, split)
    missing = [c for c in ("easy", "hard", "junk") if c not in source.dataset.features]
    if missing:
        raise SourceError(f"{location} [{split}] lacks the ground-truth columns {missing}; "
                          "give a folder with gnd_roxford5k.pkl and jpg/, or a split with image, bbx, easy, hard, junk.")
    return [Query(record[source.image_column], box=_box(record.get("bbx")), truth=_truth(record))
            for record in source.dataset]


def _truth(g: dict) -> RevisitedTruth:
    return RevisitedTruth([int(i) for i in g["easy"]], [int(i) for i in g["hard"]],
                          [int(i) for i in g["junk"]], _box(g.get("bbx")))


def _box(bbx) -> Box | None:
    return None if bbx is None else Box(*(float(v) for v in bbx))


# --- copy detection -------------------------------------------------------------------------------

def load_copies(location: str, split: str, indexed_rows: set[int], originals: int,
                transforms: list[str], seed: int) -> EvalSet:
    """Copies of the first `originals` indexed rows of the collection the index was built from;
    every other indexed image is a distractor. The positive of a copy is its original."""
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise SourceError(f"Unknown transform(s) {unknown}; choose from {', '.join(TRANSFORMS)}.")
    source = open_source(location, split)
    queries = []
    for row in source.rows():
        if len(queries) >= originals * len(transforms):
            break
        if row.index not in indexed_rows:  # skipped by the builder (face, unreadable): no original
            continue
        for n, name in enumerate(transforms):
            make = partial(_make_copy, row.image, name, seed + row.index * len(TRANSFORMS) + n)
            queries.append(Query(make, group=name, truth=row.index))
    if not queries:
        raise SourceError(f"No row of {location} [{split}] is in the index; pass the collection the index was built from.")
    return _copies_set(queries)


def load_given_copies(location: str, split: str, original_column: str, group_column: str | None,
                      limit: int | None) -> EvalSet:
    """Copies made elsewhere (such as Copydays' strong set): `original_column` holds the source row
    of each copy's original in the indexed collection, `group_column` optionally its transform."""
    source = open_source(location, split)
    missing = [c for c in (original_column, group_column) if c and c not in source.dataset.features]
    if missing:
        raise SourceError(f"{location} has no column {missing}; its columns are {list(source.dataset.features)}.")
    queries = []
    columns = [c for c in (original_column, group_column) if c]
    for i, record in enumerate(islice(source.dataset.select_columns(columns), limit)):  # no image bytes held
        group = str(record[group_column]) if group_column else "all"
        image = partial(_cell, source.dataset, source.image_column, i)
        queries.append(Query(image, group=group, truth=int(record[original_column])))
    return _copies_set(queries)


def _copies_set(queries: list[Query]) -> EvalSet:
    """Score copies by plain AP with one positive, their original: overall and per transform."""
    groups = {"all": list(range(len(queries)))}
    for i, query in enumerate(queries):
        if query.group != "all":
            groups.setdefault(query.group, []).append(i)

    def score(index: Index, rankings: list[list[int]]) -> dict[str, Summary]:
        return {name: summarise([rankings[i] for i in members], [{queries[i].truth} for i in members], PRECISION_KS[:1])
                for name, members in groups.items()}

    return EvalSet("copies", queries, "the centre box (middle half of each side) of each copy", score)


def _make_copy(original, transform: str, seed: int) -> Image.Image:
    return make_copies(load_image(original), seed, [transform])[0].image


# --- labels ---------------------------------------------------------------------------------------

def load_labelled(location: str, split: str, image_column: str | None, label_column: str | None,
                  leave_one_out: bool, limit: int | None) -> EvalSet:
    """Queries with a label; the positives are the indexed images with the same label. With
    `leave_one_out` the queries are the indexed collection itself and each query's own row is ignored."""
    source = open_source(location, split, image_column, label_column)
    if source.label_column is None:
        raise SourceError(f"{location} has no label column; pass --label-column.")
    # each image is read again when its batch is embedded, so the query list holds no image bytes
    queries = [Query(partial(_cell, source.dataset, source.image_column, row.index),
                     row=row.index if leave_one_out else None, truth=row.label)
               for row in source.rows(limit=limit) if row.label is not None]

    def score(index: Index, rankings: list[list[int]]) -> dict[str, Summary]:
        rows_of = defaultdict(set)
        for row, label in zip(index.meta.column("source_row").to_pylist(), index.meta.column("label").to_pylist()):
            rows_of[label].add(row)
        positives = [rows_of[q.truth] - {q.row} for q in queries]
        rankings = [[r for r in ranking if r != q.row] for ranking, q in zip(rankings, queries)]
        return {"all": summarise(rankings, positives, PRECISION_KS)}

    return EvalSet("labels", queries, "the centre box (middle half of each side) of each query", score)


def _cell(dataset, column: str, row: int):
    return dataset[row][column]
