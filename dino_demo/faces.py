"""Face gate: every image that enters the app or the index is checked; photos of people are refused.

Legacy MediaPipe Face Detection: mediapipe 0.10.21's wheel bundles its graphs and both models, so it runs
offline; the Tasks API FaceDetector fails on the bundled full-range model, the one that finds small faces.
`find_faces` and `face_check` are the gate's decision, shared with the batched torch detector (face_torch.py).
"""
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from .errors import UserError
from .geometry import Box
from .images import THUMBNAIL_GAP, as_rgb, thumbnail_size
from .quiet import silenced_output

Found = list[tuple[Box, float]]  # (box in the array's pixels, score)
Detector = Callable[[np.ndarray], Found]  # (h, w, 3) uint8 RGB -> faces

MAX_SIDE = 2048  # larger images are shrunk first, for speed
REDUCED_SLACK = 0.9  # a shrink by a whole factor may land this far under MAX_SIDE (work_size)
UPRIGHT, ALL_TURNS = (0,), (0, 90, 270, 180)  # sideways first: a photo on its side is the likelier slip
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
TILE = 512  # the full-range model finds faces of 10% of its view reliably: 51 px in a 512 px tile


@dataclass(frozen=True)
class FaceCheck:
    """What the gate saw in one image, best score first."""
    has_face: bool
    boxes: list[Box]  # whole pixels of the checked image
    scores: list[float]


class FaceRefused(UserError):
    """The image shows a person's face, and photos of people are not accepted; `check` holds what was found."""
    def __init__(self, check: FaceCheck, what: str = "This image", instead: str = "image"):
        super().__init__(f"{what} shows a person's face ({len(check.boxes)} found). "
                         f"Photos of people are not accepted; please upload another {instead}.")
        self.check = check


@dataclass(frozen=True)
class ViewRequest:
    """One detector run: `model` ("short" or "full" range) on the pixels of `rect` (x0, y0, x1, y1) of an
    image, letterboxed as MediaPipe does; what lies outside the image is black."""
    model: str
    rect: tuple[int, int, int, int]


RunViews = Callable[[list[tuple[int, ViewRequest]]], list[Found]]  # (image number, view) -> faces in image pixels


def find_faces(run: RunViews, sizes: list[tuple[int, int]]) -> list[Found]:
    """The gate's detection for images of `sizes`: candidates from the whole image (both models) and
    tiles (full-range), merged, each confirmed up close. `run` detects on many views at once."""
    views = [(i, v) for i, (w, h) in enumerate(sizes) for v in candidate_views(w, h)]
    found: list[Found] = [[] for _ in sizes]
    for (i, _), faces in zip(views, run(views)):
        found[i] += faces
    candidates = [[box for box, _ in _merge(f)] for f in found]
    crops = [(i, v) for i, boxes in enumerate(candidates) for box in boxes for v in confirm_views(box)]
    seen = iter(run(crops))
    confirmed: list[Found] = []
    for boxes in candidates:
        scores = [confirmed_score(box, [next(seen) for _ in confirm_views(box)]) for box in boxes]
        confirmed.append([(box, score) for box, score in zip(boxes, scores) if score > 0])
    return confirmed


def candidate_views(w: int, h: int) -> list[ViewRequest]:
    whole = (0, 0, w, h)
    return [ViewRequest("short", whole), ViewRequest("full", whole)] + [ViewRequest("full", t) for t in _tiles(w, h)]


def confirm_views(box: Box) -> list[ViewRequest]:
    """Crops 3 and 4 times the box's size around it, each seen by both models: the views alone refused
    some landscapes (petals, bokeh); real faces keep high scores up close, look-alikes don't."""
    (cx, cy), halves = box.centre, _halves(box)
    rects = [tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half)) for half in halves]
    return [ViewRequest(model, rect) for rect in rects for model in ("short", "full")]


def confirmed_score(box: Box, found: list[Found]) -> float:
    """Lowest, over the confirming views (in `confirm_views` order), of the best score of a face centred
    near the box; 0 if one view sees none."""
    side, scores = max(4.0, box.width, box.height), []
    views = confirm_views(box)
    for view, half, faces in zip(views, [h for h in _halves(box) for _ in range(2)], found):
        ox, oy = view.rect[0] + half, view.rect[1] + half  # the crop's centre, as its rounded corner puts it
        near = [s for b, s in faces if abs(b[0] + b[2] - 2 * ox) < side and abs(b[1] + b[3] - 2 * oy) < side]
        scores.append(max(near, default=0.0))
    return min(scores)


def _halves(box: Box) -> tuple[float, float]:
    side = max(4.0, box.width, box.height)
    return 1.5 * side, 2.0 * side  # PIL fills what lies outside the image with black


class MediaPipeDetector:
    """Candidates from the whole image (both models) and tiles (full-range), each confirmed up close."""
    def __init__(self, min_confidence: float = 0.5):
        try:
            from mediapipe.python.solutions import face_detection
        except ImportError as e:
            raise ImportError("The face gate needs MediaPipe: pip install mediapipe==0.10.21") from e
        with silenced_output():  # TFLite logs lines as each model loads and first runs; no setting turns them off
            self._models = {"short": face_detection.FaceDetection(min_confidence, model_selection=0),  # close-ups
                            "full": face_detection.FaceDetection(min_confidence, model_selection=1)}  # up to 5 m
            blank = np.zeros((64, 64, 3), np.uint8)
            for model in self._models.values():
                model.process(blank)

    def __call__(self, rgb: np.ndarray) -> Found:
        return find_faces(lambda views: [self._run(rgb, view) for _, view in views], [(rgb.shape[1], rgb.shape[0])])[0]

    def _run(self, rgb: np.ndarray, view: ViewRequest) -> Found:
        x0, y0 = view.rect[:2]
        return _detect(self._models[view.model], crop_black(rgb, view.rect), x0, y0)

    def close(self) -> None:
        for model in self._models.values():
            model.close()


def crop_black(rgb: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `rect`, black where it lies outside the image (as PIL's crop fills them)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = rect
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return rgb[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def _detect(model, rgb: np.ndarray, x0: int = 0, y0: int = 0) -> Found:
    """Runs one MediaPipe model on a view whose top-left corner is (x0, y0) of the image."""
    h, w = rgb.shape[:2]
    found: Found = []
    for d in model.process(np.ascontiguousarray(rgb)).detections or []:
        b = d.location_data.relative_bounding_box
        box = Box(b.xmin * w + x0, b.ymin * h + y0, (b.xmin + b.width) * w + x0, (b.ymin + b.height) * h + y0)
        found.append((box, float(d.score[0])))
    return found


def _tiles(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Tiles of 512, 1024, ... px, overlapping by a quarter: a face of 51 px or more is 10-25% of one."""
    tiles, tile = [], TILE
    while tile < max(w, h):
        step = 0.75 * tile  # a quarter of each tile overlaps the next
        xs, ys = (np.linspace(0, max(0, n - tile), math.ceil(max(0, n - tile) / step) + 1) for n in (w, h))
        tiles += [(int(x), int(y), min(int(x) + tile, w), min(int(y) + tile, h)) for y in ys for x in xs]
        tile *= 2
    return tiles


def _merge(found: Found) -> Found:
    """Keeps the best box of each group covering half of the smaller one: one face, several views."""
    kept: Found = []
    for box, score in sorted(found, key=lambda f: -f[1]):
        if all(box.overlap(k) < 0.5 for k, _ in kept):
            kept.append((box, score))
    return kept


def work_size(size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """The size (w, h) the gate checks an image of `size` at, and the whole factor it is shrunk by to get
    there (1: resampled to MAX_SIDE, or not shrunk). A whole factor averages blocks of pixels, six times
    quicker than resampling a phone's photo; it is taken where it lands within REDUCED_SLACK of MAX_SIDE
    (4032 px: 2016, 5712 px: 1904), so the smallest face the tiles find stays as small."""
    longest = max(size)
    if longest <= MAX_SIDE:
        return size, 1
    factor = math.ceil(longest / MAX_SIDE)
    if longest / factor >= REDUCED_SLACK * MAX_SIDE:
        return (math.ceil(size[0] / factor), math.ceil(size[1] / factor)), factor
    return thumbnail_size(size, MAX_SIDE), 1


def gate_view(image: Image.Image) -> Image.Image:
    """The RGB picture the detectors see: larger images shrunk (`work_size`) first, for speed. Not a copy
    where nothing needs changing: the gate only reads it."""
    work = as_rgb(image)
    size, factor = work_size(work.size)
    if factor > 1:
        return work.reduce(factor)
    return work if size == work.size else work.resize(size, Image.BILINEAR, reducing_gap=THUMBNAIL_GAP)


def face_check(found: Found, turn: int, view_size: tuple[int, int], image_size: tuple[int, int],
               min_confidence: float) -> FaceCheck:
    """The faces of at least `min_confidence` found in the gate's view (of `view_size`) turned by `turn`,
    best first, with boxes back in the original image's pixels."""
    found = sorted((f for f in found if f[1] >= min_confidence), key=lambda f: -f[1])
    boxes = [Box(*b).turned_back(turn, view_size).scaled(view_size, image_size).rounded_out(image_size)
             for b, _ in found]
    return FaceCheck(bool(found), boxes, [float(score) for _, score in found])


class FaceGate:
    """Refuses images that show a face. The detector is made on first use and shared by all threads.

    MediaPipe finds upright faces only, so a photo turned on its side (pixels turned, no EXIF tag)
    is also checked turned back: each of `turns` (degrees counter-clockwise) until a face is found.
    The cost per extra turn is measured in benchmarks/RESULTS.md, "Face gate".

    MediaPipe runs each detection on one core, so with `workers` > 1 the turns are checked side by
    side, each worker thread with its own detectors (MediaPipe graphs are not thread-safe); the
    answer is the same: the first turn, in order, that shows a face. The app uses one worker per
    core (two on a free Space); the builder keeps one per decoding process, which are many already."""

    def __init__(self, min_confidence: float = 0.5, detector: Detector | None = None,
                 turns: tuple[int, ...] = ALL_TURNS, workers: int = 1):
        self.min_confidence, self.turns = min_confidence, turns
        self._detector, self._owns_detector = detector, detector is None
        self.workers = max(1, workers) if detector is None else 1  # an injected detector is one
        self._lock = threading.Lock()  # MediaPipe graphs are not thread-safe; Gradio runs a thread pool
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each worker thread's own detector
        self._made: list = []  # the workers' detectors, closed by close()

    def check(self, image: Image.Image) -> FaceCheck:
        """Finds faces; boxes are in `image`'s pixels."""
        work, check = gate_view(image), FaceCheck(False, [], [])
        view = lambda turn: np.asarray(work.transpose(_TRANSPOSE[turn]) if turn else work)  # noqa: E731  (h, w, 3) uint8
        runs = []
        if self.workers > 1 and len(self.turns) > 1:
            pool = self._workers()
            runs = [pool.submit(self._find_here, view(turn)) for turn in self.turns]
            found = (run.result() for run in runs)
        else:
            found = (self._find(view(turn)) for turn in self.turns)  # one at a time: stops at the first face
        try:
            for turn, faces in zip(self.turns, found):
                check = face_check(faces, turn, work.size, image.size, self.min_confidence)
                if check.has_face:
                    break
        finally:
            for run in runs:
                run.cancel()  # turns not started once a face is found
        return check

    def _find(self, rgb: np.ndarray) -> Found:
        with self._lock:
            if self._detector is None:
                self._detector = self._new_detector()
            return self._detector(rgb)

    def _find_here(self, rgb: np.ndarray) -> Found:
        """Detection in a worker thread, with that thread's own detector."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self._new_detector()
            with self._lock:
                self._made.append(detector)
        return detector(rgb)

    def _new_detector(self):
        return MediaPipeDetector(self.min_confidence)

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="face-gate")
            return self._pool

    def check_many(self, images: list[Image.Image]) -> list[FaceCheck]:
        """`check` of each image; a batched detector (dino_demo.face_torch) overrides it."""
        return [self.check(image) for image in images]

    def require_no_face(self, image: Image.Image, what: str = "This image", instead: str = "image") -> None:
        """Raises FaceRefused, with a message for the user naming `what` was refused, if the image shows a face."""
        check = self.check(image)
        if check.has_face:
            raise FaceRefused(check, what, instead)

    def close(self) -> None:
        """Frees MediaPipe; a later check loads it again."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # its threads, and with them their detectors, end here
        with self._lock:
            made, self._made, self._local = self._made, [], threading.local()
            for detector in made:
                detector.close()
            if self._owns_detector and self._detector is not None:
                self._detector.close()
                self._detector = None


class NoFaceGate(FaceGate):
    """A gate that accepts every image: the explicit opt-out behind `--allow-faces`."""
    def check(self, image: Image.Image) -> FaceCheck:
        return FaceCheck(False, [], [])
