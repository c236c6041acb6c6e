"""The one path from a person's input to a result: load (with limits) -> face gate -> embed -> search -> draw.

The UI and the API call only these methods, so no route reaches the model without the face gate.
Each result carries its pictures, a JSON-able dict and how long each step took (`timings`, in ms).
"""
from __future__ import annotations

import hashlib
import io
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from . import draw
from .config import Settings
from .errors import UserError
from .faces import FaceFound, FaceGate, NoFaceGate
from .images import ImageSource, load_image
from .hub import require_hub
from .index import Index, load_index
from .matching import Matches, match_patches
from .model import Embedder, Features
from .search import Box, Hit, SearchError, normalise_box, search_image, search_region

Progress = Callable[[float, str], None]  # (fraction done, what is happening now)
THUMB_SIDE = 256  # pictures of results are drawn at the stored thumbnails' size
MATCH_HEIGHT = 384  # height of the side-by-side patch-matching picture


class FaceRefused(UserError):
    """The image shows a person's face; the app does not search with photos of people."""


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

    def __init__(self, embedder: Embedder, index: Index, gate: FaceGate | NoFaceGate,
                 max_pixels: int, max_bytes: int, max_k: int = 50):
        self.embedder, self.index, self.gate = embedder, index, gate
        self.max_pixels, self.max_bytes, self.max_k = max_pixels, max_bytes, max_k

    @classmethod
    def open(cls, settings: Settings, progress: Callable[[int, int], None] | None = None,
             gate: FaceGate | NoFaceGate | None = None) -> "Engine":
        """Load the model, then the index (a folder, hf://USER/REPO, or the default collection built once)."""
        embedder = Embedder(settings.model, device=settings.device, input_size=settings.input_size,
                            backend=settings.backend, cache_dir=settings.cache_dir / "onnx")
        index = open_index(settings.index, embedder, settings.cache_dir, settings.collection,
                           skip_faces=settings.face_gate, progress=progress)
        if gate is None:
            gate = FaceGate() if settings.face_gate else NoFaceGate()
        return cls(embedder, index, gate, settings.max_pixels, settings.max_upload_bytes, settings.max_k)

    def load(self, source: ImageSource) -> Image.Image:
        """The input as an RGB image, refused if it breaks the limits or shows a face."""
        image = load_image(source, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        try:
            self.gate.require_no_face(image)
        except FaceFound as e:
            raise FaceRefused(str(e)) from None
        return image

    def search_image(self, source: ImageSource, k: int, progress: Progress | None = None) -> SearchResults:
        """The k indexed images most like the whole input image."""
        k, timer, report = self._check_k(k), _Timer(), progress or _quiet
        report(0.0, "Checking the image")
        with timer.step("load"):
            image = self.load(source)
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image])
        return self._image_results(features, k, timer, report)

    def search_similar(self, image_id: int, k: int, progress: Progress | None = None) -> SearchResults:
        """Search from an indexed image (a clicked result) with its stored vector: no upload, no re-embedding."""
        k, timer = self._check_k(k), _Timer()
        if not 0 <= int(image_id) < self.index.count:
            raise SearchError(f"There is no image {image_id} in this index; pick one of the results shown.")
        vector = self.index.global_index.reconstruct(int(image_id))[None]  # (1, d)
        features = Features(vector, np.zeros((1, 0, vector.shape[1]), np.float32), self.embedder.grid,
                            [self.index.size(int(image_id))])
        return self._image_results(features, k, timer, progress or _quiet)

    def _image_results(self, features: Features, k: int, timer: _Timer, report: Progress) -> SearchResults:
        report(0.7, "Searching")
        with timer.step("search"):
            hits = search_image(self.index, features, k)
        with timer.step("draw"):
            items = [self._item(hit) for hit in hits]
        return SearchResults(items, features.sizes[0], None, timer.done())

    def search_region(self, source: ImageSource, box, k: int, heat: bool = False,
                      progress: Progress | None = None) -> SearchResults:
        """The k indexed images holding a region most like `box` (x0, y0, x1, y1 in the input's pixels)."""
        k, timer, report = self._check_k(k), _Timer(), progress or _quiet
        report(0.0, "Checking the image")
        with timer.step("load"):
            image = self.load(source)
            box = normalise_box(box, image.size)  # a bad box is refused before the model runs
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image])
        report(0.7, "Searching regions")
        with timer.step("search"):
            hits = search_region(self.index, features, box, k, with_heat=heat)
        with timer.step("draw"):
            items = [self._item(hit) for hit in hits]
        return SearchResults(items, image.size, box, timer.done())

    def match(self, source_a: ImageSource, source_b: ImageSource, box=None, n: int = 50,
              progress: Progress | None = None) -> MatchResult:
        """Which patches of A (or of `box` on A) and B are each other's best match, drawn as lines."""
        timer, report = _Timer(), progress or _quiet
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise SearchError(f"The number of lines must be 0 or more (got {n}).")
        report(0.0, "Checking the images")
        with timer.step("load"):
            image_a, image_b = self.load(source_a), self.load(source_b)
            box = None if box is None else normalise_box(box, image_a.size)
        report(0.4, "Embedding")
        with timer.step("embed"):
            features = self.embedder.embed([image_a, image_b])
        a, b = _split(features)
        report(0.7, "Matching patches")
        with timer.step("search"):
            matches = match_patches(a, b, box)
        with timer.step("draw"):
            picture = draw.draw_matches(image_a, image_b, matches, n, height=min(MATCH_HEIGHT, max(image_a.height, image_b.height)))
        return MatchResult(picture, matches, min(int(n), len(matches)), timer.done())

    def result_image(self, image_id: int) -> Image.Image:
        """The stored thumbnail of an indexed image (a grey tile if the index kept none)."""
        row = self.index.row(int(image_id))
        if row.get("thumbnail"):
            return Image.open(io.BytesIO(row["thumbnail"])).convert("RGB")
        w, h = row["width"], row["height"]
        scale = THUMB_SIDE / max(w, h)
        return draw.draw_placeholder((max(1, round(w * scale)), max(1, round(h * scale))))

    def _item(self, hit: Hit) -> ResultItem:
        row = self.index.row(hit.id)
        size = (int(row["width"]), int(row["height"]))
        picture = self.result_image(hit.id)
        if hit.heat is not None:
            picture = draw.draw_heatmap(picture, hit.heat)
        if hit.box is not None:
            picture = draw.draw_box(picture, hit.box, original_size=size)
        return ResultItem(hit.id, hit.score, row.get("label"), size, picture, hit.box)

    def _check_k(self, k) -> int:
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise SearchError(f"The number of results must be between 1 and {self.max_k} (got {k}).")
        return int(k)


def _split(features: Features) -> tuple[Features, Features]:
    """Two one-image Features from a batch of two."""
    def one(i: int) -> Features:
        return Features(features.cls[i:i + 1], features.patches[i:i + 1], features.grid, [features.sizes[i]])
    return one(0), one(1)


def _quiet(fraction: float, what: str) -> None:
    pass


# --- where the index comes from -------------------------------------------------------------------

HUB_PREFIX = "hf://"
BuildProgress = Callable[[int, int], None]  # (images done, images in all)


def open_index(location: str | None, embedder: Embedder, cache_dir: Path, collection: Path,
               skip_faces: bool = True, progress: BuildProgress | None = None) -> Index:
    """An index folder, a hub dataset repo (hf://USER/REPO), or None: the default collection, built once."""
    model = embedder.describe()
    if location is None:
        return load_index(build_default_index(embedder, cache_dir, collection, skip_faces, progress), model)
    if location.startswith(HUB_PREFIX):
        return load_index(download_index(location[len(HUB_PREFIX):]), model)
    return load_index(Path(location).expanduser(), model)


def download_index(repo: str) -> Path:
    """The local copy of an index uploaded as a dataset repo; reuses the hub cache when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if repo.count("/") != 1:
        raise UserError(f"'{HUB_PREFIX}{repo}' is not a hub dataset repo; write it as {HUB_PREFIX}USER/REPO.")
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass  # not cached yet
    require_hub(f"the index {repo}",
                f"download it where there is internet (`hf download --repo-type dataset {repo} "
                f"--local-dir indexes/{repo.split('/')[-1]}`) and pass that folder as --index.")
    try:
        return Path(snapshot_download(repo, repo_type="dataset"))
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Could not download the index {repo}: {first} Check the name and your access.") from None


def default_index_dir(cache_dir: Path, model_id: str, input_size: int) -> Path:
    """One cached index of the default collection per model and input size: readable name, hash for uniqueness."""
    name = Path(str(model_id).rstrip("/")).name or "model"
    digest = hashlib.sha1(f"{model_id}@{input_size}".encode()).hexdigest()[:8]
    return Path(cache_dir) / "default-index" / f"{name}-{input_size}px-{digest}"


def build_default_index(embedder: Embedder, cache_dir: Path, collection: Path, skip_faces: bool = True,
                        progress: BuildProgress | None = None) -> Path:
    """Index `collection` into the cache the first time (resuming a killed build); later calls reuse it."""
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    out = default_index_dir(cache_dir, embedder.model_id, embedder.input_size)
    if (out / "manifest.json").is_file():
        return out
    source = open_source(str(collection))
    total = source.num_rows or 0
    options = BuildOptions(batch_size=16, workers=0, chunk_size=64, skip_faces=skip_faces)

    def report(decoded) -> None:
        if progress is not None:
            progress(decoded.last_row + 1, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    build_index(source, embedder, str(out), options, report)
    return out
