"""What DINO sees: the CLS attention of each head, the object mask DINO draws from it, and the patch
features' principal components painted as colours.

The mask is DINO's (visualize_attention.py): the most attended patches that together hold `share` of the
attention mass. The colours are DINOv2's: the first principal component of all patches separates the
object from the background (its sign set so the attended patches lie high; split at Otsu's threshold),
and three components fitted on the object's patches alone become red, green and blue. A basis is fitted
on a whole batch at once (every frame of a clip, or both images of a pair), so the same part gets the
same colour throughout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Box, Grid, Size, cells_box
from .model import Attended, Features

DEFAULT_SHARE = 60  # percent of the attention mass the mask keeps, as in DINO's visualisation


@dataclass
class Basis:
    """Principal axes of some patch features and the range each projection is scaled from to 0..1."""

    mean: np.ndarray  # (d,)
    axes: np.ndarray  # (k, d) orthonormal, strongest first
    low: np.ndarray  # (k,) projections at or below this become 0
    high: np.ndarray  # (k,) ... at or above this 1

    def project(self, patches: np.ndarray) -> np.ndarray:
        """(n, k) coordinates of (n, d) features along the axes."""
        return (patches - self.mean) @ self.axes.T

    def colours(self, patches: np.ndarray) -> np.ndarray:
        """(n, k) float32 in 0..1: each projection scaled by the range seen when fitting."""
        span = np.maximum(self.high - self.low, 1e-6)
        return np.clip((self.project(patches) - self.low) / span, 0.0, 1.0).astype(np.float32)


def fit_basis(patches: np.ndarray, k: int = 3) -> Basis:
    """The k principal axes of (n, d) features, signs fixed (largest loading positive) so that refitting
    on the same features gives the same colours; the range is the 1st to 99th percentile, so a few
    outlying patches do not wash the rest out."""
    mean = patches.mean(axis=0)
    centred = (patches - mean).astype(np.float64)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # (d, d): cheaper than an SVD of (n, d) for a clip's n
    axes = vectors[:, ::-1][:, :min(k, len(patches))].T.astype(np.float32)
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    if len(axes) < k:  # fewer patches than components: the missing ones stay at mid-grey
        axes = np.concatenate([axes, np.zeros((k - len(axes), patches.shape[1]), axes.dtype)])
    projected = (patches - mean) @ axes.T
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    return Basis(mean, axes, low, high)


def otsu_threshold(values: np.ndarray) -> float:
    """The cut between two groups of values that makes each group as tight as possible (Otsu, 1979)."""
    ordered = np.sort(np.asarray(values, np.float64).ravel())
    n = len(ordered)
    if n < 2 or ordered[0] == ordered[-1]:
        return float(ordered[0]) if n else 0.0
    below = np.arange(1, n)  # cut after each position
    sums = np.cumsum(ordered)[:-1]
    mean_low, mean_high = sums / below, (ordered.sum() - sums) / (n - below)
    between = below * (n - below) * (mean_low - mean_high) ** 2  # between-group variance, times n^2
    best = int(np.argmax(between))
    return float((ordered[best] + ordered[best + 1]) / 2)


def mass_mask(attention: np.ndarray, share: float) -> np.ndarray:
    """(gh, gw) bool: the fewest most-attended patches whose attention reaches `share` (0..1) of the whole."""
    flat = attention.ravel().astype(np.float64)
    flat = flat / flat.sum() if flat.sum() > 0 else np.full(flat.shape, 1 / flat.size)
    order = np.argsort(-flat, kind="stable")
    kept = min(int(np.searchsorted(np.cumsum(flat[order]), share - 1e-9)) + 1, flat.size)
    mask = np.zeros(flat.size, bool)
    mask[order[:kept]] = True
    return mask.reshape(attention.shape)


def normalised_heads(attention: np.ndarray) -> np.ndarray:
    """(heads, gh, gw) float32 attention with each head's map summing to 1 over the patches."""
    sums = attention.sum(axis=(-2, -1), keepdims=True)
    return (attention / np.maximum(sums, 1e-12)).astype(np.float32)


# --- the mask as pixels, for people and for programs --------------------------------------------

def pixel_cells(pixels: int, cells: int) -> np.ndarray:
    """(pixels,) the grid cell holding each pixel's centre (geometry.py: cells tile the image exactly)."""
    return np.minimum(((np.arange(pixels) + 0.5) * cells / pixels).astype(np.int64), cells - 1)


def pixel_mask(cells: np.ndarray, size: Size) -> np.ndarray:
    """(h, w) bool: a (gh, gw) cell mask drawn at `size` pixels."""
    (gh, gw), (w, h) = cells.shape, size
    return cells[pixel_cells(h, gh)][:, pixel_cells(w, gw)]


def run_lengths(cells: np.ndarray, size: Size) -> dict:
    """COCO's uncompressed RLE of the mask at `size` pixels: counts of alternating 0s and 1s (0s first),
    column by column; pycocotools.mask.frPyObjects reads it. Computed from the cells, never from the
    (possibly 40-megapixel) pixel mask."""
    (gh, gw), (w, h) = cells.shape, size
    columns = cells[pixel_cells(h, gh)].T  # (gw, h): each column of cells at pixel rows
    inner = [np.flatnonzero(np.diff(col.astype(np.int8))) + 1 for col in columns]  # value changes within
    changes, last = [], False
    for x, c in enumerate(pixel_cells(w, gw)):
        if columns[c][0] != last:
            changes.append(np.array([x * h]))
        changes.append(inner[c] + x * h)
        last = columns[c][-1]
    edges = np.concatenate([[0], *changes, [w * h]])
    return {"size": [h, w], "counts": np.diff(edges).astype(int).tolist()}


def components(cells: np.ndarray) -> list[np.ndarray]:
    """The mask's 8-connected parts, each a (gh, gw) bool mask, largest first."""
    labels = np.zeros(cells.shape, np.int32)
    parts = []
    for start in zip(*np.nonzero(cells)):
        if labels[start]:
            continue
        labels[start] = len(parts) + 1
        todo = [start]
        while todo:
            r, c = todo.pop()
            for nr in range(max(r - 1, 0), min(r + 2, cells.shape[0])):
                for nc in range(max(c - 1, 0), min(c + 2, cells.shape[1])):
                    if cells[nr, nc] and not labels[nr, nc]:
                        labels[nr, nc] = len(parts) + 1
                        todo.append((nr, nc))
        parts.append(labels == len(parts) + 1)
    return sorted(parts, key=lambda p: -int(p.sum()))


def cells_bounds(cells: np.ndarray, size: Size) -> Box:
    """The pixel box around a non-empty cell mask."""
    rows, cols = np.nonzero(cells)
    return cells_box(size, cells.shape, (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max())))


def mask_json(cells: np.ndarray, size: Size) -> dict:
    """The mask for programs: its share of the image, its box and, per connected part, the part's box,
    share and run-length encoding in the image's own pixels."""
    if not cells.any():
        return {"share": 0.0, "box": None, "components": []}
    parts = [{"box": _rounded(cells_bounds(part, size)), "share": round(float(part.mean()), 4),
              "rle": run_lengths(part, size)} for part in components(cells)]
    return {"share": round(float(cells.mean()), 4), "box": _rounded(cells_bounds(cells, size)), "components": parts}


def _rounded(box: Box) -> list[float]:
    return [round(float(v), 1) for v in box]


# --- what DINO sees in a batch of images ---------------------------------------------------------

@dataclass
class Sight:
    """What DINO sees in one image."""

    heads: np.ndarray  # (heads, gh, gw) float32, each head's CLS attention summing to 1
    mask: np.ndarray  # (gh, gw) bool: the patches holding `share` of the mean attention
    colours: np.ndarray  # (gh, gw, 3) float32 in 0..1: principal components as RGB
    foreground: np.ndarray  # (gh, gw) bool: where the colours are shown bright
    size: Size  # the image's (width, height)

    def to_json(self) -> dict:
        return {"mask": mask_json(self.mask, self.size),
                "foreground_share": round(float(self.foreground.mean()), 4)}


def look(attended: Attended, share: float) -> list[Sight]:
    """A Sight per image of the batch, the colours from one basis fitted on all of them (`share` in %)."""
    features, heads = attended.features, normalised_heads(attended.attention)
    means = heads.mean(axis=1)  # (n, gh, gw)
    masks = [mass_mask(m, share / 100) for m in means]
    foreground = split_foreground(features.patches, means.reshape(len(means), -1))  # (n, p)
    colours = paint(features.patches, foreground)
    gh, gw = features.grid
    return [Sight(heads[i], masks[i], colours[i].reshape(gh, gw, 3), foreground[i].reshape(gh, gw),
                  features.sizes[i]) for i in range(len(means))]


def split_foreground(patches: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """(n, p) bool from (n, p, d) patches and their (n, p) attention: above Otsu's cut on the first principal
    component of all patches, its sign chosen so that the more attended patches lie high."""
    flat = patches.reshape(-1, patches.shape[-1])
    first = fit_basis(flat, 1).project(flat)[:, 0]
    weights = attention.ravel() - attention.mean()
    if float(first @ weights) < 0:
        first = -first
    return (first > otsu_threshold(first)).reshape(patches.shape[:2])


def paint(patches: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(n, p, 3) colours of (n, p, d) patches from three components fitted on the foreground patches
    (on all of them when too few are foreground to fit three)."""
    flat = patches.reshape(-1, patches.shape[-1])
    chosen = flat[foreground.ravel()] if foreground.sum() >= 4 else flat
    return fit_basis(chosen, 3).colours(flat).reshape(*patches.shape[:2], 3)


# --- two images seen together --------------------------------------------------------------------

@dataclass
class CoSegmentation:
    """The parts of two images whose features agree, coloured from one basis fitted on both."""

    colours: list[np.ndarray]  # per image (gh, gw, 3) float32 in 0..1
    agree: list[np.ndarray]  # per image (gh, gw) bool: patches with a close match in the other image
    similarity: list[np.ndarray]  # per image (gh, gw) float32: each patch's best cosine in the other image
    sizes: list[Size]

    def to_json(self) -> dict:
        return {"images": [{"mask": mask_json(agree, size), "mean_best_similarity": round(float(sim.mean()), 4)}
                           for agree, sim, size in zip(self.agree, self.similarity, self.sizes)],
                "grid": list(self.agree[0].shape)}  # the patch grid the parts were found on


def co_segment(a: Features, b: Features) -> CoSegmentation:
    """Where images a and b agree: each patch's best cosine similarity in the other image, cut at Otsu's
    threshold over both images' values; three components fitted on the agreeing patches of both colour them."""
    grid: Grid = a.grid
    pa, pb = a.patches[0], b.patches[0]  # (p, d) each, L2-normalised
    sims = pa @ pb.T
    best = [sims.max(axis=1), sims.max(axis=0)]
    cut = otsu_threshold(np.concatenate(best))
    agree = [s > cut for s in best]
    colours = paint(np.stack([pa, pb]), np.stack(agree))
    return CoSegmentation([c.reshape(*grid, 3) for c in colours], [m.reshape(grid) for m in agree],
                          [s.reshape(grid).astype(np.float32) for s in best], [a.sizes[0], b.sizes[0]])
