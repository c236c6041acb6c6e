"""Face gate: every image that enters the app or the index is checked; photos of people are refused.

Uses MediaPipe's legacy Face Detection solution because mediapipe 0.10.21's wheel bundles its graphs
(.binarypb) and both models (.tflite), so it runs offline. The Tasks API FaceDetector loads the bundled
short-range model too, but rejects the full-range (sparse) one, which is the one that finds small faces.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels
Found = list[tuple[tuple[float, float, float, float], float]]  # (box in the array's pixels, score)
Detector = Callable[[np.ndarray], Found]  # (h, w, 3) uint8 RGB -> faces

MAX_SIDE = 2048  # larger images are shrunk first, for speed; their smallest faces are then ~32 px here
TILE = 512  # the full-range model finds faces of 10% of its view reliably: 51 px in a 512 px tile


@dataclass(frozen=True)
class FaceCheck:
    """What the gate saw in one image, best score first."""

    has_face: bool
    boxes: list[Box]
    scores: list[float]


class FaceFound(ValueError):
    """Raised for an image that shows a face; `check` holds what was found."""

    def __init__(self, check: FaceCheck):
        super().__init__(
            f"This image shows a person's face ({len(check.boxes)} found). "
            "Photos of people are not accepted; please upload another image."
        )
        self.check = check


def _tile_starts(length: int, tile: int) -> list[int]:
    """Offsets of tiles that cover `length` with at least a quarter of a tile overlap."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (0.75 * tile)) + 1
    return sorted({round(s) for s in np.linspace(0, length - tile, n)})


def _tiles(w: int, h: int) -> list[Box]:
    """Tiles of 512, 1024, ... px: every face of 51 px or more is 10-25% of a tile that holds all of it."""
    tiles, tile = [], TILE
    while tile < max(w, h):
        tiles += [(x, y, min(x + tile, w), min(y + tile, h))
                  for y in _tile_starts(h, tile) for x in _tile_starts(w, tile)]
        tile *= 2
    return tiles


def _merge(found: Found) -> Found:
    """Keeps the best box of each group that overlaps by half the smaller box: one face, several views."""
    kept: Found = []
    for box, score in sorted(found, key=lambda f: -f[1]):
        if all(_overlap(box, k) < 0.5 for k, _ in kept):
            kept.append((box, score))
    return kept


def _overlap(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / smaller if smaller > 0 else 0.0


class MediaPipeDetector:
    """Short- and full-range models on the whole image, full-range on tiles for faces in crowds and landscapes."""

    def __init__(self, min_confidence: float = 0.5):
        try:
            from mediapipe.python.solutions import face_detection
        except ImportError as e:
            raise ImportError("The face gate needs MediaPipe: pip install mediapipe==0.10.21") from e
        self._short = face_detection.FaceDetection(min_confidence, model_selection=0)
        self._full = face_detection.FaceDetection(min_confidence, model_selection=1)

    def __call__(self, rgb: np.ndarray) -> Found:
        found = _detect(self._short, rgb, 0, 0) + _detect(self._full, rgb, 0, 0)
        for x0, y0, x1, y1 in _tiles(rgb.shape[1], rgb.shape[0]):
            found += _detect(self._full, rgb[y0:y1, x0:x1], x0, y0)
        return _merge(found)

    def close(self) -> None:
        self._short.close()
        self._full.close()


def _detect(model, rgb: np.ndarray, x0: int, y0: int) -> Found:
    """Runs one MediaPipe model on a view whose top-left corner is (x0, y0) of the image."""
    h, w = rgb.shape[:2]
    found: Found = []
    for d in model.process(np.ascontiguousarray(rgb)).detections or []:
        b = d.location_data.relative_bounding_box
        box = (x0 + b.xmin * w, y0 + b.ymin * h, x0 + (b.xmin + b.width) * w, y0 + (b.ymin + b.height) * h)
        found.append((box, float(d.score[0])))
    return found


class FaceGate:
    """Refuses images that show a face. The detector is made on first use and shared by all threads."""

    def __init__(self, min_confidence: float = 0.5, detector: Detector | None = None):
        self.min_confidence = min_confidence
        self._detector = detector
        self._lock = threading.Lock()  # MediaPipe graphs are not thread-safe; Gradio runs handlers in a pool

    def check(self, image: Image.Image) -> FaceCheck:
        """Finds faces; boxes are in `image`'s pixels."""
        work = image.convert("RGB")
        scale = min(1.0, MAX_SIDE / max(work.size))
        if scale < 1:
            work = work.resize((round(work.width * scale), round(work.height * scale)), Image.BILINEAR)
        rgb = np.asarray(work)  # (h, w, 3) uint8
        with self._lock:
            if self._detector is None:
                self._detector = MediaPipeDetector(self.min_confidence)
            found = self._detector(rgb)
        found = sorted((f for f in found if f[1] >= self.min_confidence), key=lambda f: -f[1])
        boxes = [_to_pixels(box, scale, image.width, image.height) for box, _ in found]
        return FaceCheck(bool(found), boxes, [float(s) for _, s in found])

    def require_no_face(self, image: Image.Image) -> None:
        """Raises FaceFound, with a message for the user, if the image shows a face."""
        check = self.check(image)
        if check.has_face:
            raise FaceFound(check)

    def close(self) -> None:
        """Frees the detector; a later check makes a new one if the gate made it."""
        with self._lock:
            if isinstance(self._detector, MediaPipeDetector):
                self._detector.close()
                self._detector = None


def _to_pixels(box, scale: float, w: int, h: int) -> Box:
    x0, y0, x1, y1 = (v / scale for v in box)
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(w, math.ceil(x1)), min(h, math.ceil(y1)))


class NoFaceGate:
    """A gate that accepts every image: the explicit opt-out behind `--allow-faces`."""

    def check(self, image: Image.Image) -> FaceCheck:
        return FaceCheck(False, [], [])

    def require_no_face(self, image: Image.Image) -> None:
        pass

    def close(self) -> None:
        pass
