"""The one path from a person's input to a result: load (with limits) -> face gate -> embed -> search -> draw.

The UI and the API call only these methods, so no route reaches the model without the face gate.
Each result carries its pictures, a JSON-able dict and how long each step took (`timings`, in ms).
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from . import draw
from .config import Settings
from .faces import FaceGate, NoFaceGate
from .geometry import Box, fit_box
from .images import THUMB_SIDE, ImageSource, load_image
from .index import Index
from .live_index import LiveIndex
from .matching import MATCH_LINES, Matches, match_patches
from .model import Embedder, Features
from .search import Hit, SearchError, check_k, search_image, search_region

Progress = Callable[[float, str], None]  # (fraction done, what is happening now)


def load_embedder(settings: Settings, built: dict | None = None) -> Embedder:
    """The backbone the settings name or, unnamed, the one an index was `built` with (Embedder.for_index),
    on the settings' device and query backend."""
    return Embedder.for_index(built, settings.model, settings.input_size, device=settings.device,
                              backend=settings.backend, cache_dir=settings.cache_dir)


@dataclass
class ResultItem:
    """One result, ready to show: the picture has its matching region boxed (and heat map) drawn."""

    id: int
    score: float
    label: str | None
    size: tuple[int, int]  # the indexed image's original (width, height)
    picture: Image.Image
    box: Box | None = None  # matching region in the indexed image's original pixels

    @property
    def caption(self) -> str:
        return f"{self.label or f'#{self.id}'} · {self.score:.3f}"

    def to_json(self) -> dict:
        out = {"id": self.id, "label": self.label, "score": round(self.score, 4),
               "width": self.size[0], "height": self.size[1]}
        if self.box is not None:
            out["box"] = [round(v, 1) for v in self.box]
        return out


@dataclass
class SearchResults:
    """Top-k results of an image or region query."""

    items: list[ResultItem]
    query_size: tuple[int, int]
    box: Box | None = None  # the query box, corners ordered and clipped to the image
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        query = {"width": self.query_size[0], "height": self.query_size[1]}
        if self.box is not None:
            query["box"] = [round(v, 1) for v in self.box]
        return {"query": query, "results": [item.to_json() for item in self.items],
                "timings_ms": {k: round(v, 1) for k, v in self.timings.items()}}


@dataclass
class MatchResult:
    """Mutual nearest-neighbour patch matches between two images, and the picture of the strongest."""

    picture: Image.Image
    matches: Matches  # all matches, strongest first
    shown: int  # how many of them the picture draws
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return f"{len(self.matches)} matches, mean similarity {self.matches.mean_score:.3f}"

    def to_json(self) -> dict:
        top = self.matches.top(self.shown)
        pairs = [{"a": [round(float(v), 1) for v in pa], "b": [round(float(v), 1) for v in pb], "score": round(float(s), 4)}
                 for pa, pb, s in zip(top.points_a, top.points_b, top.scores)]
        return {"count": len(self.matches), "mean_score": round(self.matches.mean_score, 4),
                "box": None if self.matches.box is None else [round(v, 1) for v in self.matches.box],
                "pairs": pairs, "timings_ms": {k: round(v, 1) for k, v in self.timings.items()}}


class _Timer:
    """Collects the milliseconds each named step takes."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000

    def done(self) -> dict[str, float]:
        return {**self.ms, "total": (time.perf_counter() - self._start) * 1000}


class Engine:
    """An embedder, an index and a face gate, and the only methods that turn inputs into results."""

    def __init__(self, embedder: Embedder, index: Index | LiveIndex, gate: FaceGate | NoFaceGate,
                 max_pixels: int, max_bytes: int, max_k: int = 50):
        self.embedder, self.gate = embedder, gate
        self.live = index if isinstance(index, LiveIndex) else LiveIndex.fixed(index)
        self.max_pixels, self.max_bytes, self.max_k = max_pixels, max_bytes, max_k

    @property
    def index(self) -> Index:
        """The index as it is now. Each request reads this once and uses that one throughout, so a
        change swapped in meanwhile (LiveIndex) never shows it half of one state and half of another."""
        return self.live.index

    @classmethod
    def from_settings(cls, settings: Settings, embedder: Embedder, index: Index,
                      gate: FaceGate | NoFaceGate | None = None) -> "Engine":
        """An engine with the settings' limits and face gate (or `gate`, e.g. a test's stub)."""
        if gate is None:
            gate = FaceGate() if settings.face_gate else NoFaceGate()
        return cls(embedder, index, gate, settings.max_pixels, settings.max_upload_bytes, settings.max_k)

    def load(self, source: ImageSource) -> Image.Image:
        """The input as an RGB image, refused if it breaks the limits or shows a face (FaceRefused)."""
        image = load_image(source, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        self.gate.require_no_face(image)
        return image

    def search_image(self, source: ImageSource, k: int, progress: Progress | None = None) -> SearchResults:
        """The k indexed images most like the whole input image."""
        k, timer, report = check_k(k, self.max_k), _Timer(), progress or _quiet
        report(0.0, "Checking the image")
        with timer.step("load"):
            image = self.load(source)
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image])
        return self._image_results(self.index, features, k, timer, report)

    def search_similar(self, image_id: int, k: int, progress: Progress | None = None) -> SearchResults:
        """Search from an indexed image (a clicked result) with its stored vector: no upload, no re-embedding."""
        k, timer, index = check_k(k, self.max_k), _Timer(), self.index
        if isinstance(image_id, float) and image_id.is_integer():
            image_id = int(image_id)  # JSON clients may send 3.0
        if not isinstance(image_id, (int, np.integer)) or not index.has(image_id):
            raise SearchError(f"There is no image {image_id} in this index (it may have been removed); "
                              "pick one of the results shown.")
        vector = index.vector(int(image_id))[None]  # (1, d)
        features = Features(vector, np.zeros((1, 0, vector.shape[1]), np.float32), self.embedder.grid,
                            [index.size(int(image_id))])
        return self._image_results(index, features, k, timer, progress or _quiet)

    def _image_results(self, index: Index, features: Features, k: int, timer: _Timer, report: Progress) -> SearchResults:
        report(0.7, "Searching")
        with timer.step("search"):
            hits = search_image(index, features, k)
        with timer.step("draw"):
            items = [self._item(index, hit) for hit in hits]
        return SearchResults(items, features.sizes[0], None, timer.done())

    def search_region(self, source: ImageSource, box, k: int, heat: bool = False,
                      progress: Progress | None = None) -> SearchResults:
        """The k indexed images holding a region most like `box` (x0, y0, x1, y1 in the input's pixels)."""
        k, timer, report, index = check_k(k, self.max_k), _Timer(), progress or _quiet, self.index
        report(0.0, "Checking the image")
        with timer.step("load"):
            image = self.load(source)
            box = fit_box(box, image.size)  # a bad box is refused before the model runs
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image])
        report(0.7, "Searching regions")
        with timer.step("search"):
            hits = search_region(index, features, box, k, with_heat=heat)
        with timer.step("draw"):
            items = [self._item(index, hit) for hit in hits]
        return SearchResults(items, image.size, box, timer.done())

    def match(self, source_a: ImageSource, source_b: ImageSource, box=None, n: int = MATCH_LINES,
              progress: Progress | None = None) -> MatchResult:
        """Which patches of A (or of `box` on A) and B are each other's best match, drawn as lines."""
        timer, report = _Timer(), progress or _quiet
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise SearchError(f"The number of lines must be 0 or more (got {n}).")
        report(0.0, "Checking the images")
        with timer.step("load"):
            image_a, image_b = self.load(source_a), self.load(source_b)
            box = None if box is None else fit_box(box, image_a.size)
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image_a, image_b])
        a, b = features.one(0), features.one(1)
        report(0.7, "Matching patches")
        with timer.step("search"):
            matches = match_patches(a, b, box)
        with timer.step("draw"):
            picture = draw.draw_matches(image_a, image_b, matches, n, height=min(draw.MATCH_HEIGHT, max(image_a.height, image_b.height)))
        return MatchResult(picture, matches, min(int(n), len(matches)), timer.done())

    def result_image(self, image_id: int, index: Index | None = None) -> Image.Image:
        """The stored thumbnail of an indexed image (a grey tile if the index kept none); a removed
        image's is refused (NoSuchImage)."""
        return _thumbnail((index or self.index).row(int(image_id)))

    def _item(self, index: Index, hit: Hit) -> ResultItem:
        row = index.row(hit.id)  # one read of its metadata and thumbnail
        size = (int(row["width"]), int(row["height"]))
        picture = _thumbnail(row)
        if hit.heat is not None:
            picture = draw.draw_heatmap(picture, hit.heat)
        if hit.box is not None:
            picture = draw.draw_box(picture, hit.box, original_size=size)
        return ResultItem(hit.id, hit.score, row.get("label"), size, picture, hit.box)


def _thumbnail(row: dict) -> Image.Image:
    """An indexed image's thumbnail from its metadata row, or a grey tile of its shape if none was kept."""
    if row.get("thumbnail"):
        return Image.open(io.BytesIO(row["thumbnail"])).convert("RGB")
    w, h = row["width"], row["height"]
    scale = THUMB_SIDE / max(w, h)
    return draw.draw_placeholder((max(1, round(w * scale)), max(1, round(h * scale))))


def _quiet(fraction: float, what: str) -> None:
    pass
