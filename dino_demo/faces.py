"""Face gate: every image that enters the app or the index is checked; photos of people are refused.

Legacy MediaPipe Face Detection: mediapipe 0.10.21's wheel bundles its graphs and both models, so it runs
offline; the Tasks API FaceDetector fails on the bundled full-range model, the one that finds small faces.
"""
import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from .errors import UserError
from .geometry import Box
from .quiet import silenced_output

Found = list[tuple[Box, float]]  # (box in the array's pixels, score)
Detector = Callable[[np.ndarray], Found]  # (h, w, 3) uint8 RGB -> faces

MAX_SIDE = 2048  # larger images are shrunk first, for speed
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


class MediaPipeDetector:
    """Candidates from the whole image (both models) and tiles (full-range), each confirmed up close."""
    def __init__(self, min_confidence: float = 0.5):
        try:
            from mediapipe.python.solutions import face_detection
        except ImportError as e:
            raise ImportError("The face gate needs MediaPipe: pip install mediapipe==0.10.21") from e
        with silenced_output():  # TFLite logs lines as each model loads and first runs; no setting turns them off
            self._short = face_detection.FaceDetection(min_confidence, model_selection=0)  # close-ups
            self._full = face_detection.FaceDetection(min_confidence, model_selection=1)  # up to 5 m
            blank = np.zeros((64, 64, 3), np.uint8)
            self._short.process(blank), self._full.process(blank)

    def __call__(self, rgb: np.ndarray) -> Found:
        found = _detect(self._short, rgb) + _detect(self._full, rgb)
        for x0, y0, x1, y1 in _tiles(rgb.shape[1], rgb.shape[0]):
            found += _detect(self._full, rgb[y0:y1, x0:x1], x0, y0)
        image = Image.fromarray(rgb)
        confirmed = [(box, self._confirm(image, box)) for box, _ in _merge(found)]
        return [(box, score) for box, score in confirmed if score > 0]

    def _confirm(self, image: Image.Image, box) -> float:
        """Lowest score of both models for a face at the box, on crops 3 and 4 times its size: the views
        alone refused some landscapes (petals, bokeh); real faces keep high scores up close, look-alikes don't."""
        side = max(4.0, box.width, box.height)
        cx, cy = box.centre
        scores = []
        for half in (1.5 * side, 2.0 * side):  # PIL fills what lies outside the image with black
            crop = image.crop(tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half)))
            for model in (self._short, self._full):
                near = [s for b, s in _detect(model, np.asarray(crop), -half, -half)  # box centre is (0, 0)
                        if abs(b[0] + b[2]) < side and abs(b[1] + b[3]) < side]
                scores.append(max(near, default=0.0))
        return min(scores)

    def close(self) -> None:
        self._short.close()
        self._full.close()


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


class FaceGate:
    """Refuses images that show a face. The detector is made on first use and shared by all threads.

    MediaPipe finds upright faces only, so a photo turned on its side (pixels turned, no EXIF tag)
    is also checked turned back: each of `turns` (degrees counter-clockwise) until a face is found.
    The cost per extra turn is measured in benchmarks/RESULTS.md, "Face gate"."""

    def __init__(self, min_confidence: float = 0.5, detector: Detector | None = None,
                 turns: tuple[int, ...] = ALL_TURNS):
        self.min_confidence, self.turns = min_confidence, turns
        self._detector, self._owns_detector = detector, detector is None
        self._lock = threading.Lock()  # MediaPipe graphs are not thread-safe; Gradio runs a thread pool

    def check(self, image: Image.Image) -> FaceCheck:
        """Finds faces; boxes are in `image`'s pixels."""
        work = image.convert("RGB")
        work.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
        for turn in self.turns:
            view = work.transpose(_TRANSPOSE[turn]) if turn else work
            with self._lock:
                if self._detector is None:
                    self._detector = MediaPipeDetector(self.min_confidence)
                found = self._detector(np.asarray(view))  # (h, w, 3) uint8
            found = sorted((f for f in found if f[1] >= self.min_confidence), key=lambda f: -f[1])
            if found:
                boxes = [Box(*b).turned_back(turn, work.size).scaled(work.size, image.size).rounded_out(image.size)
                         for b, _ in found]
                return FaceCheck(True, boxes, [float(score) for _, score in found])
        return FaceCheck(False, [], [])

    def require_no_face(self, image: Image.Image) -> None:
        """Raises FaceRefused, with a message for the user, if the image shows a face."""
        check = self.check(image)
        if check.has_face:
            raise FaceRefused(check)

    def close(self) -> None:
        """Frees MediaPipe; a later check loads it again."""
        with self._lock:
            if self._owns_detector and self._detector is not None:
                self._detector.close()
                self._detector = None


class NoFaceGate(FaceGate):
    """A gate that accepts every image: the explicit opt-out behind `--allow-faces`."""
    def check(self, image: Image.Image) -> FaceCheck:
        return FaceCheck(False, [], [])
