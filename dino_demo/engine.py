"""The one path from a person's input to a result: load (with limits) -> face gate -> embed -> search (or
match, or look) -> draw.

The UI and the API call only these methods, so no route reaches the model without the face gate.
An uploaded image may have been through load, gate and embed already, begun in spare time as its file
landed (`prepare_upload`, uploads.py): the same steps in the same order, only earlier. Each result
carries its pictures, a JSON-able dict and how long each step took (`timings`, in ms).
"""
from __future__ import annotations

import functools
import io
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import threadpoolctl
from PIL import Image

from . import attention, draw
from .attention import DEFAULT_SHARE, CoSegmentation, Sight
from .backbones import describe_registers, short_name
from .config import Settings
from .errors import UserError
from .faces import ALL_TURNS, FaceGate, NoFaceGate
from .frames import ClipLimits, VideoSource, read_clip, write_video
from .geometry import Box, fit_box
from .images import THUMB_SIDE, ImageSource, load_image
from .index import Index
from .live_index import LiveIndex
from .matching import MATCH_LINES, Matches, match_patches
from .model import Attended, Embedder, Features
from .search import Hit, SearchError, check_k, search_image, search_region
from .uploads import Prepared, Uploads

Progress = Callable[[float, str], None]  # (fraction done, what is happening now)
SIGHT_SIDE = 640  # longer side of the mask and colour pictures of a photo
# A clip's frames are shrunk to this before anything else: the face gate checks, the model sees and the video
# shows the same picture, and at the gate's tile size a frame needs no tiles (a quarter of its time at 1080p).
FRAME_SIDE = 512


def blas_on_one_thread() -> None:
    """numpy's and FAISS's BLAS (OpenBLAS) run each matrix product on one thread, process-wide. A request's
    products are small (a region's re-ranking, patch matching, PCA colours), and after each one the idle
    BLAS threads spin for about 0.1 s: a region search took 183 ms of the server's CPU with them, 97 ms
    without, on the two cores the client, Gradio, the face gate and ONNX Runtime share."""
    threadpoolctl.threadpool_limits(1, user_api="blas")


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
    jpeg: bytes | None = None  # the stored thumbnail's own bytes, when `picture` is it with nothing drawn

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
                "timings_ms": _rounded_ms(self.timings)}


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
                "grid": None if self.matches.grid is None else list(self.matches.grid),
                "pairs": pairs, "timings_ms": _rounded_ms(self.timings)}


@dataclass
class SightResult:
    """What DINO sees in a photo: its attention maps, the object mask and the feature colours, drawn."""

    maps: Image.Image  # the photo, the heads' mean attention and each head's, side by side
    mask: Image.Image
    colours: Image.Image
    sight: Sight
    share: float  # percent of the attention mass the mask keeps
    model: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "share": self.share, "width": self.sight.size[0], "height": self.sight.size[1],
                "heads": len(self.sight.heads), "grid": list(self.sight.mask.shape), **self.sight.to_json(),
                "timings_ms": _rounded_ms(self.timings)}


@dataclass
class ClipResult:
    """What DINO sees in each sampled frame of a clip, as a video (mask | colours) and per-frame facts."""

    video: Path  # H.264 MP4
    sights: list[Sight]
    times: list[float]  # seconds from the start of each frame analysed
    share: float
    model: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        frames = [{"frame": i, "time": round(t, 3), **sight.to_json()}
                  for i, (t, sight) in enumerate(zip(self.times, self.sights))]
        width, height = self.sights[0].size
        return {"model": self.model, "share": self.share, "width": width, "height": height, "frames": frames,
                "seconds_per_frame": round(self.timings.get("total", 0) / 1000 / len(frames), 4),
                "timings_ms": _rounded_ms(self.timings)}


@dataclass
class CoSegmentResult:
    """The parts of two images whose features agree, coloured alike (co-segmentation), drawn side by side."""

    picture: Image.Image
    parts: CoSegmentation
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.parts.to_json(), "timings_ms": _rounded_ms(self.timings)}


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


def _serving(method):
    """An engine request: no upload is prepared early while it runs (uploads.Uploads uses spare time only)."""
    @functools.wraps(method)
    def serve(self, *args, **kwargs):
        with self.uploads.serving():
            return method(self, *args, **kwargs)
    return serve


class Engine:
    """An embedder, an index and a face gate, and the only methods that turn inputs into results."""

    def __init__(self, embedder: Embedder, index: Index | LiveIndex, gate: FaceGate | NoFaceGate,
                 max_pixels: int, max_bytes: int, max_k: int = 50, clip_limits: ClipLimits = ClipLimits(),
                 match_embedder: Embedder | None = None):
        self.embedder, self.gate = embedder, gate
        # Matching and co-segmentation search no index, so they may see a larger input than the index's
        # (finer patches); searches always embed at the index's own input size.
        self.match_embedder = match_embedder or embedder
        self.live = index if isinstance(index, LiveIndex) else LiveIndex.fixed(index)
        self.max_pixels, self.max_bytes, self.max_k = max_pixels, max_bytes, max_k
        self.clip_limits = clip_limits
        self.uploads = Uploads(self._prepare)

    @property
    def index(self) -> Index:
        """The index as it is now. Each request reads this once and uses that one throughout, so a
        change swapped in meanwhile (LiveIndex) never shows it half of one state and half of another."""
        return self.live.index

    @classmethod
    def from_settings(cls, settings: Settings, embedder: Embedder, index: Index,
                      gate: FaceGate | NoFaceGate | None = None) -> "Engine":
        """An engine with the settings' limits and face gate (or `gate`, e.g. a test's stub), serving: BLAS
        on one thread from now on, in this process (blas_on_one_thread)."""
        blas_on_one_thread()
        if gate is None:
            # The four turns side by side, one MediaPipe worker per core (faces.FaceGate).
            gate = FaceGate(workers=min(len(ALL_TURNS), os.cpu_count() or 1)) if settings.face_gate else NoFaceGate()
        limits = ClipLimits(settings.video_seconds, settings.video_frames, settings.video_pixels,
                            settings.max_upload_bytes, settings.video_fps)
        return cls(embedder, index, gate, settings.max_pixels, settings.max_upload_bytes, settings.max_k, limits,
                   embedder.at_input_size(settings.match_input_size))

    def load(self, source: ImageSource) -> Image.Image:
        """The input as an RGB image, refused if it breaks the limits or shows a face (FaceRefused)."""
        image = load_image(source, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        self.gate.require_no_face(image)
        return image

    def warm_up(self) -> None:
        """Runs, on a blank picture, what is otherwise made by the first request that needs it: the face
        gate's detectors (MediaPipe loads its graphs in each worker, ≈ 0.9 s in all on 2 cores), the model's
        first run, and the export that also returns attention for What DINO sees (a session to load, or, once
        per cache, an export to make: seconds). The app runs it in the background as it starts."""
        blank = Image.new("RGB", (64, 64), (128, 128, 128))
        self.gate.check(blank)  # the four turns go to every worker, which each load their detector
        for embedder in dict.fromkeys((self.embedder, self.match_embedder)):
            embedder.embed([blank])
        self.embedder.attend([blank])

    def prepare_upload(self, path: str) -> bool:
        """Begins, in spare time, the load, face gate and embedding of an image file just uploaded, for the
        request that will name it (uploads.Uploads); returns whether it began."""
        return self.uploads.begin(path)

    def _prepare(self, path: str) -> Prepared:
        image = self.load(path)
        return Prepared(image, self.embedder.embed([image]))

    def _loaded(self, source: ImageSource) -> tuple[Image.Image, Features | None]:
        """`load(source)`, and the features at the index's input size when its upload was prepared. A
        request's "load" step then holds the wait for the prepared work, and its "embed" step is nothing."""
        prepared = self.uploads.take(source)
        if prepared is not None:
            return prepared.image, prepared.features
        return self.load(source), None

    @_serving
    def search_image(self, source: ImageSource, k: int, progress: Progress | None = None) -> SearchResults:
        """The k indexed images most like the whole input image."""
        k, timer, report = check_k(k, self.max_k), _Timer(), progress or _quiet
        report(0.0, "Checking the image")
        with timer.step("load"):
            image, features = self._loaded(source)
        report(0.4, "Embedding")
        with timer.step("embed"):
            if features is None:
                features = self.embedder.embed([image])
        return self._image_results(self.index, features, k, timer, report)

    @_serving
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
            items = self._items(index, hits)
        return SearchResults(items, features.sizes[0], None, timer.done())

    @_serving
    def search_region(self, source: ImageSource, box, k: int, heat: bool = False,
                      progress: Progress | None = None) -> SearchResults:
        """The k indexed images holding a region most like `box` (x0, y0, x1, y1 in the input's pixels)."""
        k, timer, report, index = check_k(k, self.max_k), _Timer(), progress or _quiet, self.index
        report(0.0, "Checking the image")
        with timer.step("load"):
            image, features = self._loaded(source)
            box = fit_box(box, image.size)  # a bad box is refused before the model runs
        report(0.4, "Embedding")
        with timer.step("embed"):
            if features is None:
                features = self.embedder.embed([image])
        report(0.7, "Searching regions")
        with timer.step("search"):
            hits = search_region(index, features, box, k, with_heat=heat)
        with timer.step("draw"):
            items = self._items(index, hits)
        return SearchResults(items, image.size, box, timer.done())

    @_serving
    def match(self, source_a: ImageSource, source_b: ImageSource, box=None, n: int = MATCH_LINES,
              progress: Progress | None = None) -> MatchResult:
        """Which patches of A (or of `box` on A) and B are each other's best match, drawn as lines."""
        timer, report = _Timer(), progress or _quiet
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise SearchError(f"The number of lines must be 0 or more (got {n}).")
        image_a, image_b, box, features = self._pair(source_a, source_b, box, timer, report)
        a, b = features.one(0), features.one(1)
        report(0.7, "Matching patches")
        with timer.step("search"):
            matches = match_patches(a, b, box)
        with timer.step("draw"):
            picture = draw.draw_matches(image_a, image_b, matches, n, height=min(draw.MATCH_HEIGHT, max(image_a.height, image_b.height)))
        return MatchResult(picture, matches, min(int(n), len(matches)), timer.done())

    @_serving
    def co_segment(self, source_a: ImageSource, source_b: ImageSource, progress: Progress | None = None) -> CoSegmentResult:
        """The parts of A and B whose features agree, each coloured alike from one basis fitted on both."""
        timer, report = _Timer(), progress or _quiet
        image_a, image_b, _, features = self._pair(source_a, source_b, None, timer, report)
        report(0.7, "Finding the parts that agree")
        with timer.step("colours"):
            parts = attention.co_segment(features.one(0), features.one(1))
        with timer.step("draw"):
            pictures = [draw.draw_colours(draw.shrunk(image, SIGHT_SIDE), colours, agree)
                        for image, colours, agree in zip((image_a, image_b), parts.colours, parts.agree)]
            picture = draw.side_by_side(pictures, min(draw.MATCH_HEIGHT, max(p.height for p in pictures)))
        return CoSegmentResult(picture, parts, timer.done())

    def _pair(self, source_a: ImageSource, source_b: ImageSource, box, timer: "_Timer", report: Progress):
        """Both images loaded and gated, the box fitted to A, and their features."""
        report(0.0, "Checking the images")
        with timer.step("load"):
            (image_a, features_a), (image_b, features_b) = self._loaded(source_a), self._loaded(source_b)
            box = None if box is None else fit_box(box, image_a.size)
        report(0.4, "Embedding")
        with timer.step("embed"):
            if self.match_embedder is self.embedder and features_a is not None and features_b is not None:
                features = Features.joined([features_a, features_b])
            else:
                features = self.match_embedder.embed([image_a, image_b])
        return image_a, image_b, box, features

    @_serving
    def what_dino_sees(self, source: ImageSource, share: float = DEFAULT_SHARE,
                       progress: Progress | None = None) -> SightResult:
        """The last layer's CLS attention per head, the mask holding `share` % of it, and the feature colours."""
        share, timer, report = check_share(share), _Timer(), progress or _quiet
        report(0.0, "Checking the image")
        with timer.step("load"):
            image = self._loaded(source)[0]
        report(0.4, "Looking")
        with timer.step("model"):
            attended = self.embedder.attend([image])
        with timer.step("colours"):
            sight = attention.look(attended, share)[0]
        report(0.8, "Drawing")
        with timer.step("draw"):
            shown = draw.shrunk(image, SIGHT_SIDE)
            pictures = (draw.draw_attention_maps(shown, sight.heads), draw.draw_mask(shown, sight.mask),
                        draw.draw_colours(shown, sight.colours, sight.foreground))
        return SightResult(*pictures, sight, share, self.model_name, timer.done())

    @_serving
    def what_dino_sees_video(self, source: VideoSource, share: float, out_dir: Path,
                             progress: Progress | None = None) -> ClipResult:
        """What DINO sees on every sampled frame of a clip, written to `out_dir` as an MP4 (mask | colours).
        Every frame passes the face gate before any is analysed; a face anywhere refuses the whole clip."""
        share, timer, report = check_share(share), _Timer(), progress or _quiet
        report(0.0, "Reading the clip")
        with timer.step("decode"):
            clip = read_clip(source, self.clip_limits)
            frames = [draw.shrunk(frame, FRAME_SIDE) for frame in clip.frames]  # what is checked, analysed, shown
        with timer.step("face_gate"):
            for i, (frame, time_) in enumerate(zip(frames, clip.times)):
                report(0.05 + 0.3 * i / len(frames), f"Checking frame {i + 1} of {len(frames)} for faces")
                self.gate.require_no_face(frame, f"Frame {i + 1} of the clip (at {time_:.1f} s)", "clip")
        with timer.step("model"):
            attended = self._attend_frames(frames, report)
        with timer.step("colours"):  # one basis for all frames: a part keeps its colour
            sights = [replace(sight, size=clip.size) for sight in attention.look(attended, share)]
        report(0.85, "Drawing the frames")
        with timer.step("draw"):
            panels = [draw.side_by_side([draw.draw_mask(frame, sight.mask),
                                         draw.draw_colours(frame, sight.colours, sight.foreground)], frame.height, gap=8)
                      for frame, sight in zip(frames, sights)]
        report(0.95, "Writing the video")
        with timer.step("encode"):
            out_dir.mkdir(parents=True, exist_ok=True)
            video = write_video(panels, clip.rate, out_dir / f"what-dino-sees-{uuid.uuid4().hex[:12]}.mp4")
        return ClipResult(video, sights, clip.times, share, self.model_name, timer.done())

    def _attend_frames(self, frames: list[Image.Image], report: Progress) -> Attended:
        step, parts = min(self.embedder.batch_size, 8), []  # small batches: the progress bar moves
        for start in range(0, len(frames), step):
            report(0.35 + 0.5 * start / len(frames), f"Looking at frames {start + 1}-{min(start + step, len(frames))}")
            parts.append(self.embedder.attend(frames[start:start + step]))
        return Attended.joined(parts)

    @property
    def model_name(self) -> str:
        """The backbone as people read it, with whether it has registers (its attention maps differ)."""
        return f"{short_name(self.embedder.model_id)} ({describe_registers(self.embedder.model_type, self.embedder.num_prefix_tokens - 1)})"

    def result_image(self, image_id: int, index: Index | None = None) -> Image.Image:
        """The stored thumbnail of an indexed image (a grey tile if the index kept none); a removed
        image's is refused (NoSuchImage)."""
        return _thumbnail((index or self.index).row(int(image_id)))

    def _items(self, index: Index, hits: list[Hit]) -> list[ResultItem]:
        """Each hit's result picture (its thumbnail, boxed or heat-mapped) from one read of the rows."""
        return [self._item(hit, row) for hit, row in zip(hits, index.rows([hit.id for hit in hits]))]

    @staticmethod
    def _item(hit: Hit, row: dict) -> ResultItem:
        size = (int(row["width"]), int(row["height"]))
        picture = _thumbnail(row)
        if hit.heat is not None:
            picture = draw.draw_heatmap(picture, hit.heat)
        if hit.box is not None:
            picture = draw.draw_box(picture, hit.box, original_size=size)
        jpeg = (row.get("thumbnail") or None) if hit.heat is None and hit.box is None else None  # nothing drawn on it
        return ResultItem(hit.id, hit.score, row.get("label"), size, picture, hit.box, jpeg)


def _thumbnail(row: dict) -> Image.Image:
    """An indexed image's thumbnail from its metadata row, or a grey tile of its shape if none was kept."""
    if row.get("thumbnail"):
        return Image.open(io.BytesIO(row["thumbnail"])).convert("RGB")
    w, h = row["width"], row["height"]
    scale = THUMB_SIDE / max(w, h)
    return draw.draw_placeholder((max(1, round(w * scale)), max(1, round(h * scale))))


def check_share(share) -> float:
    """The mask's share of the attention mass in percent, from any number a client sends."""
    if isinstance(share, bool) or not isinstance(share, (int, float, np.number)) or not 1 <= share <= 100:
        raise UserError(f"The share of attention to keep must be a percentage from 1 to 100 (got {share!r}); "
                        f"{DEFAULT_SHARE} is DINO's own choice.")
    return float(share)


def _rounded_ms(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in timings.items()}


def _quiet(fraction: float, what: str) -> None:
    pass
