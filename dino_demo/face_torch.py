"""The face gate's decision with MediaPipe's own BlazeFace models run batched in PyTorch (on a GPU for builds).

The weights are read from the .tflite files inside the mediapipe wheel; pre-processing (letterbox, value
range), SSD anchors, box decoding, weighted non-max suppression and thresholds follow MediaPipe's face
detection graphs, so the gate finds the same faces as `faces.FaceGate` (tests/test_face_torch.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .faces import ALL_TURNS, FaceCheck, FaceGate, Found, ViewRequest, face_check, find_faces, gate_view, work_size
from .geometry import Box
from .images import picture_size, resize_picture

BACKENDS = ("auto", "mediapipe", "torch")
NMS_IOU = 0.3  # NonMaxSuppressionCalculator: min_suppression_threshold, IoU, WEIGHTED
SCORE_CLIP = 100.0  # TensorsToDetectionsCalculator: score_clipping_thresh, before the sigmoid


@dataclass(frozen=True)
class BlazeFace:
    """One MediaPipe face model and the options its graph gives it (FaceDetectionShortRange/FullRange)."""
    file: str
    size: int  # input tensor side; also the box scale (x_scale ... h_scale)
    strides: tuple[int, ...]  # SsdAnchorsCalculator layers
    interpolated_ratio: float  # an extra anchor per layer when > 0
    min_score: float  # TensorsToDetectionsCalculator's min_score_thresh


# The graphs' own thresholds hold: mediapipe 0.10.21 returns the same detections whatever
# min_detection_confidence the Python FaceDetection is given (measured from 0.1 to 0.95); the gate then
# keeps faces of at least its own min_confidence.
MODELS = {"short": BlazeFace("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 1.0, 0.5),
          "full": BlazeFace("face_detection_full_range_sparse.tflite", 192, (4,), 0.0, 0.6)}


def model_folder() -> Path:
    """Where the mediapipe wheel keeps its face models."""
    import mediapipe

    return Path(mediapipe.__file__).parent / "modules" / "face_detection"


def make_anchors(model: BlazeFace) -> np.ndarray:
    """SsdAnchorsCalculator's anchor centres, (A, 2) x, y in 0..1; sizes are fixed at 1 (fixed_anchor_size)."""
    centres, layer = [], 0
    while layer < len(model.strides):
        stride, same = model.strides[layer], _same(model.strides, layer)
        per_cell = same * (2 if model.interpolated_ratio > 0 else 1)  # aspect ratio 1, plus the interpolated one
        cells = math.ceil(model.size / stride)
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
        layer += same
    return np.array(centres, np.float32)


def _same(strides: tuple[int, ...], layer: int) -> int:
    """How many layers from `layer` on share its stride: their anchors are merged on one grid."""
    n = 0
    while layer + n < len(strides) and strides[layer + n] == strides[layer]:
        n += 1
    return n


@dataclass
class Uploaded:
    """A batch of gate views (the upright pictures) on the device: their pixels end to end, (n, 3) uint8."""
    pixels: torch.Tensor
    starts: list[int]  # first pixel of each picture
    sizes: list[tuple[int, int]]  # (w, h) of each


def upload(pictures: list[np.ndarray | torch.Tensor], device: str) -> Uploaded:
    """(h, w, 3) uint8 pictures (arrays, or tensors already on the device) -> one tensor on the device; the
    arrays are joined first and copied in one go."""
    starts = np.cumsum([0] + [p.shape[0] * p.shape[1] for p in pictures])[:-1].tolist()
    sizes = [(p.shape[1], p.shape[0]) for p in pictures]
    if all(isinstance(p, np.ndarray) for p in pictures):
        flat = np.concatenate([p.reshape(-1, 3) for p in pictures]) if pictures else np.zeros((0, 3), np.uint8)
        return Uploaded(torch.from_numpy(flat).to(device), starts, sizes)
    return Uploaded(torch.cat([torch.as_tensor(p).reshape(-1, 3).to(device) for p in pictures]), starts, sizes)


@dataclass(frozen=True)
class View:
    """A ViewRequest on picture `image` turned `turn` degrees counter-clockwise (rect in the turned picture)."""
    image: int
    turn: int
    request: ViewRequest


def sample_views(images: Uploaded, views: list[View], size: int) -> torch.Tensor:
    """MediaPipe's ImageToTensorCalculator on CPU for each view: OpenCV's warpPerspective of the rect,
    letterboxed, into a square of `size` (bilinear, 1/32 px fixed point, black border, uint8 result),
    then scaled to -1..1, reproduced to the bit. -> (V, size, size, 3) float32."""
    device = images.pixels.device
    p = _view_params(images, views, device)  # each (V, 1, 1, 1, 1)
    fixed_x, fixed_y = _source_positions(views, size, device)  # (V, size, size): 32 * source x, y
    dx = torch.tensor([0, 1], device=device)
    lx = (fixed_x >> 5)[..., None, None] + dx  # (V, y, x, 1, 2): the pixels either side, in the view
    ly = (fixed_y >> 5)[..., None, None] + dx[:, None]  # (V, y, x, 2, 1)
    fx, fy = (fixed_x & 31)[..., None, None], (fixed_y & 31)[..., None, None]
    weight = torch.where(dx == 1, fx, 32 - fx) * torch.where(dx[:, None] == 1, fy, 32 - fy)  # out of 2^10
    xt, yt = lx + p["x0"], ly + p["y0"]  # in the turned picture; outside the view or the picture: black
    inside = (lx >= 0) & (lx < p["rw"]) & (xt >= 0) & (xt < p["tw"]) & (ly >= 0) & (ly < p["rh"]) & (yt >= 0) & (yt < p["th"])
    index = _pixel_index(xt.clamp(min=0).minimum(p["tw"] - 1), yt.clamp(min=0).minimum(p["th"] - 1), p)
    values = images.pixels[index].to(torch.int32)  # (V, y, x, 2, 2, 3)
    total = (values * (weight * inside).to(torch.int32)[..., None]).sum(dim=(3, 4))
    pixels = (total + 512) >> 10  # OpenCV's rounding of its fixed-point sum
    return pixels.float() * (2.0 / 255.0) - 1.0  # output_tensor_float_range -1..1


def _source_positions(views: list[View], size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where warpPerspective samples each tensor pixel, in 1/32 px of the view, computed as OpenCV does
    (its inverse matrix, 64-column blocks, double precision, round half to even): a position that lands
    on a half step goes the way OpenCV's own rounding noise sends it. -> (V, size, size) int64 each."""
    m = torch.tensor(np.stack([_inverse_map(*_rect_size(v), size) for v in views]), device=device)  # (V, 9)
    m = m.view(-1, 9, 1, 1).unbind(1)
    u = torch.arange(size, device=device, dtype=torch.float64)
    row, block = u.view(-1, 1), torch.div(u, 64, rounding_mode="floor") * 64  # warpPerspective's BLOCK_SZ^2 / 16
    col = u - block
    x0, y0, w0 = (m[0] * block + m[1] * row) + m[2], (m[3] * block + m[4] * row) + m[5], (m[6] * block + m[7] * row) + m[8]
    w = w0 + m[6] * col
    w = torch.where(w != 0, 32 / torch.where(w != 0, w, 1), 0)
    return torch.round((x0 + m[0] * col) * w).long(), torch.round((y0 + m[3] * col) * w).long()


def _rect_size(view: View) -> tuple[int, int]:
    x0, y0, x1, y1 = view.request.rect
    return x1 - x0, y1 - y0


@lru_cache(maxsize=4096)
def _inverse_map(width: int, height: int, size: int) -> np.ndarray:
    """The tensor -> view pixel map MediaPipe's OpenCV converter builds for a width x height view (the
    rect about its centre padded to a square: keep_aspect_ratio), as OpenCV inverts it. (9,) float64."""
    import cv2  # opencv-contrib-python comes with mediapipe

    side = float(max(width, height))
    corners = cv2.boxPoints(((width / 2, height / 2), (side, side), 0.0)).astype(np.float32)
    target = np.array([[0, size], [0, 0], [size, 0], [size, size]], np.float32)  # as boxPoints orders them
    forward = cv2.getPerspectiveTransform(corners, target)  # LU, as MediaPipe's build solves it
    return cv2.invert(forward)[1].reshape(9)


def _pixel_index(xt: torch.Tensor, yt: torch.Tensor, p: dict) -> torch.Tensor:
    """Pixel (xt, yt) of a picture turned counter-clockwise -> its place in the uploaded upright pixels."""
    w, h, turn = p["w"], p["h"], p["turn"]
    if p["one_turn"] is not None:  # a gate's round checks one turn: index arithmetic without selects
        xo, yo = {0: (xt, yt), 90: (w - 1 - yt, xt), 180: (w - 1 - xt, h - 1 - yt), 270: (yt, h - 1 - xt)}[p["one_turn"]]
        return p["start"] + yo * w + xo
    xo = torch.where(turn == 90, w - 1 - yt, torch.where(turn == 180, w - 1 - xt, torch.where(turn == 270, yt, xt)))
    yo = torch.where(turn == 90, xt, torch.where(turn == 180, h - 1 - yt, torch.where(turn == 270, h - 1 - xt, yt)))
    return p["start"] + yo * w + xo


def _view_params(images: Uploaded, views: list[View], device) -> dict[str, torch.Tensor]:
    """Each view's picture, turn and rect as (V, 1, 1, 1, 1) tensors, against (V, y, x, 2, 2) positions."""
    rows = []
    for v in views:
        w, h = images.sizes[v.image]
        tw, th = (h, w) if v.turn in (90, 270) else (w, h)
        x0, y0, x1, y1 = v.request.rect
        rows.append((images.starts[v.image], w, h, tw, th, v.turn, x0, y0, x1 - x0, y1 - y0))
    names = ("start", "w", "h", "tw", "th", "turn", "x0", "y0", "rw", "rh")
    table = torch.tensor(rows, dtype=torch.long, device=device).view(-1, len(names))
    p = {n: table[:, i].view(-1, 1, 1, 1, 1) for i, n in enumerate(names)}
    p["one_turn"] = views[0].turn if len({v.turn for v in views}) == 1 else None
    return p


def decode(raw_boxes: torch.Tensor, raw_scores: torch.Tensor, anchors: torch.Tensor, size: int,
           min_score: float) -> list[np.ndarray]:
    """TensorsToDetectionsCalculator: (V, A, 16) offsets and (V, A, 1) logits -> per view the boxes that
    pass, (n, 5) score, x0, y0, x1, y1 in the tensor's 0..1 (reverse_output_order: x before y)."""
    scores = torch.sigmoid(raw_scores[..., 0].clamp(-SCORE_CLIP, SCORE_CLIP))
    cx, cy = raw_boxes[..., 0] / size + anchors[:, 0], raw_boxes[..., 1] / size + anchors[:, 1]
    w, h = raw_boxes[..., 2] / size, raw_boxes[..., 3] / size  # anchors have size 1 (fixed_anchor_size)
    rows = torch.stack([scores, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)  # (V, A, 5)
    keep = (scores >= min_score) & (w >= 0) & (h >= 0)  # it also drops boxes of negative size
    view, anchor = keep.nonzero(as_tuple=True)
    kept = rows[view, anchor].double().cpu().numpy()  # the few that pass, to the CPU at once
    view = view.cpu().numpy()
    return [kept[view == v] for v in range(len(scores))]


def weighted_nms(found: np.ndarray) -> np.ndarray:
    """NonMaxSuppressionCalculator's WEIGHTED algorithm: the best box and every box overlapping it by IoU
    > 0.3 become their score-weighted mean, with the best one's score. (n, 5) -> (m, 5)."""
    rest, kept = found[np.argsort(-found[:, 0], kind="stable")], []
    while len(rest):
        group = _iou(rest[0, 1:], rest[:, 1:]) > NMS_IOU
        weights = rest[group, :1]
        box = (rest[group, 1:] * weights).sum(0) / weights.sum() if group.any() else rest[0, 1:]
        kept.append(np.concatenate([rest[:1, 0], box]))
        if not group.any():  # a box of no area overlaps nothing, itself included: MediaPipe stops there
            break
        rest = rest[~group]
    return np.array(kept).reshape(-1, 5)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.where((w >= 0) & (h >= 0), w * h, 0.0)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def project(found: np.ndarray, view: View, size: int) -> Found:
    """DetectionProjectionCalculator, then the gate's own step: boxes in the turned picture's pixels."""
    x0, y0, x1, y1 = view.request.rect
    side = max(x1 - x0, y1 - y0)
    ox, oy = x0 + (x1 - x0) / 2 - side / 2, y0 + (y1 - y0) / 2 - side / 2  # the letterbox's corner
    return [(Box(ox + a * side, oy + b * side, ox + c * side, oy + d * side), float(score))
            for score, a, b, c, d in found]


class TorchFaceDetector:
    """Both BlazeFace models on one device; runs the views of many pictures through each model together."""

    def __init__(self, device: str = "cpu", views_per_pass: int | None = None):
        from .tflite_torch import TFLiteNet

        self.device = device
        self.views_per_pass = views_per_pass or (1024 if device == "cuda" else 32)  # CPU: bounded memory
        folder = model_folder()
        self.nets = {name: TFLiteNet(folder / m.file).to(device).eval() for name, m in MODELS.items()}
        self.anchors = {name: torch.from_numpy(make_anchors(m)).to(device) for name, m in MODELS.items()}

    @torch.inference_mode()
    def run(self, images: Uploaded, views: list[View]) -> list[Found]:
        """Faces in each view, in its turned picture's pixels (what faces.RunViews returns)."""
        found: list[Found] = [[] for _ in views]
        for name, model in MODELS.items():
            picked = [i for i, v in enumerate(views) if v.request.model == name]
            for start in range(0, len(picked), self.views_per_pass):
                chunk = picked[start:start + self.views_per_pass]
                inputs = sample_views(images, [views[i] for i in chunk], model.size)
                boxes, scores = sorted(self.nets[name](inputs), key=lambda t: -t.shape[-1])  # (V, A, 16), (V, A, 1)
                for i, kept in zip(chunk, decode(boxes, scores, self.anchors[name], model.size, model.min_score)):
                    found[i] = project(weighted_nms(kept), views[i], model.size)
        return found

    def close(self) -> None:
        self.nets.clear()


class TorchFaceGate(FaceGate):
    """FaceGate's decision, with MediaPipe's models in PyTorch: `check_many` checks a batch of images at once
    (all their views of one turn through each model together), on `device`."""

    def __init__(self, min_confidence: float = 0.5, turns: tuple[int, ...] = ALL_TURNS, device: str = "cpu"):
        super().__init__(min_confidence, turns=turns)
        self.device = device

    def check(self, image: Image.Image) -> FaceCheck:
        return self.check_many([image])[0]

    def check_many(self, images: list[Image.Image | torch.Tensor]) -> list[FaceCheck]:
        """Each image (PIL, or a (3, H, W) uint8 tensor, which is checked where it lies) checked in one batch."""
        works = [np.asarray(gate_view(im)) if isinstance(im, Image.Image) else tensor_gate_view(im) for im in images]
        sizes = [im.size if isinstance(im, Image.Image) else picture_size(im) for im in images]
        checks = [FaceCheck(False, [], [])] * len(images)
        with self._lock:
            if self._detector is None:
                self._detector = TorchFaceDetector(self.device)
            pictures = upload(works, self.device)
            pending = list(range(len(images)))
            for turn in self.turns:  # the next turn only for images still without a face, as FaceGate does
                found = find_faces(partial(self._run, pictures, pending, turn),
                                   [_turned(pictures.sizes[i], turn) for i in pending])
                for i, faces in zip(pending, found):
                    checks[i] = face_check(faces, turn, pictures.sizes[i], sizes[i], self.min_confidence)
                pending = [i for i in pending if not checks[i].has_face]
        return checks

    def _run(self, pictures: Uploaded, pending: list[int], turn: int, requests) -> list[Found]:
        return self._detector.run(pictures, [View(pending[k], turn, request) for k, request in requests])


def tensor_gate_view(picture: torch.Tensor) -> torch.Tensor:
    """`faces.gate_view` of a (3, H, W) uint8 tensor, where it lies: (h, w, 3), shrunk as `work_size` says:
    by a whole factor as PIL's `reduce` does (the mean of each block, the edge's partial blocks included;
    PIL's fixed-point sums can round one level apart), or resampled."""
    size, factor = work_size(picture_size(picture))
    if factor > 1:
        mean = torch.nn.functional.avg_pool2d(picture[None].float(), factor, ceil_mode=True)[0]
        return mean.add_(0.5).floor_().to(torch.uint8).permute(1, 2, 0)
    return resize_picture(picture, size, "bilinear").permute(1, 2, 0)


def _turned(size: tuple[int, int], turn: int) -> tuple[int, int]:
    return (size[1], size[0]) if turn in (90, 270) else size


def gate_factory(backend: str, device: str) -> Callable[..., FaceGate]:
    """The builder's face gate: MediaPipe, or its models in torch (batched; on the GPU when `device` is
    cuda). auto: torch on a GPU, where MediaPipe's CPU time would hold the build back; MediaPipe elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"face gate backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "mediapipe" or (backend == "auto" and device != "cuda"):
        return FaceGate
    return partial(TorchFaceGate, device="cuda" if device == "cuda" else "cpu")


def gate_needs_spawn(factory: Callable[..., FaceGate]) -> bool:
    """Whether decoding processes with gates from `factory` must be spawned, not forked: torch in a process
    forked after the parent ran torch hangs (OpenMP's threads) or cannot start CUDA."""
    return getattr(factory, "func", factory) is TorchFaceGate or isinstance(factory, type) and issubclass(factory, TorchFaceGate)
