"""Image retrieval and region retrieval over an index folder.

Region search: the patches under the user's box each search `patches.faiss`; hits vote for
their image; the best candidates are re-ranked exactly on all their patches, so a compressed
patch index only has to find candidates, never to rank them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .index import Index
from .model import Features, patch_boxes
from .patch_select import slot_cells, slots_to_grid

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in an image's own pixels


class SearchError(UserError):
    """A query that cannot be answered as asked (empty box, k out of range...)."""


@dataclass
class Hit:
    """One result: an indexed image, how similar it is, and for regions where the match lies."""

    id: int
    score: float  # cosine similarity (image search) or mean best-patch cosine (region search)
    box: Box | None = None  # matching region in the hit's original pixels
    heat: np.ndarray | None = None  # (gh, gw) best similarity of each hit patch to the region


def check_k(k: int, limit: int = 1000) -> int:
    """Refuse k < 1 with a clear message; cap a huge k at `limit`."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"The number of results must be at least 1 (got {k}).")
    return int(min(k, limit))


def search_image(index: Index, features: Features, k: int = 10) -> list[Hit]:
    """The k indexed images whose CLS vectors are closest to the query's (image 0 of `features`)."""
    k = min(check_k(k), index.count)
    scores, ids = index.global_index.search(features.cls[:1], k)
    return [Hit(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]


def normalise_box(box, size: tuple[int, int]) -> Box:
    """Order the corners and clip to the image; refuse a box with no area inside it."""
    if box is None or len(box) != 4:
        raise SearchError("Draw a box on the image first: drag with the mouse over the region to search.")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    w, h = size
    x0, x1 = max(0.0, x0), min(float(w), x1)
    y0, y1 = max(0.0, y0), min(float(h), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise SearchError(
            f"The box ({box}) has no area inside the {w}x{h} image; drag out a larger box over the region."
        )
    return (x0, y0, x1, y1)


def select_patches(size: tuple[int, int], grid: tuple[int, int], box: Box) -> np.ndarray:
    """Indices of the patches whose centre lies in `box`; the most-covered patch if none does."""
    boxes = patch_boxes(size, grid)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = box
    inside = np.flatnonzero((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1))
    if inside.size:
        return inside
    overlap_w = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
    overlap_h = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
    return np.array([int(np.argmax(overlap_w * overlap_h))])


def search_region(
    index: Index,
    features: Features,
    box,
    k: int = 10,
    candidates: int = 200,
    per_patch: int = 256,
    with_heat: bool = False,
) -> list[Hit]:
    """The k images holding the region most like the query's `box` (image 0 of `features`)."""
    k = min(check_k(k), index.count)
    box = normalise_box(box, features.sizes[0])
    query = features.patches[0, select_patches(features.sizes[0], features.grid, box)]  # (m, d)
    ranked = _candidates(index, query, per_patch)[: max(candidates, k)]
    sims = {image_id: query @ image_patches(index, image_id).T for image_id in ranked}  # each (m, slots)
    # Exact score of each candidate: mean over query patches of their best similarity in it.
    best = sorted(ranked, key=lambda i: -float(sims[i].max(axis=1).mean()))[:k]
    return [_hit(index, image_id, sims[image_id], with_heat) for image_id in best]


def _candidates(index: Index, query: np.ndarray, per_patch: int) -> list[int]:
    """Image ids ordered by votes: the sum over query patches of each image's best hit."""
    scores, ids = index.patch_index.search(query, min(per_patch, index.patch_index.ntotal))  # (m, per_patch)
    found = ids >= 0
    which = np.broadcast_to(np.arange(len(query))[:, None], ids.shape)[found]
    images, slot = np.unique(ids[found] // index.patches_per_image, return_inverse=True)
    best = np.zeros((len(images), len(query)), np.float32)  # an image's best score per query patch
    np.maximum.at(best, (slot, which), scores[found])
    return images[np.argsort(-best.sum(axis=1), kind="stable")].tolist()


def image_patches(index: Index, image_id: int) -> np.ndarray:
    """(slots, d) stored patch vectors of one indexed image, read back from the patch index
    (from 8-bit codes in a compressed index: near exact, so the re-ranking is too)."""
    per_image = index.patches_per_image
    return index.patch_index.reconstruct_n(image_id * per_image, per_image)


def _hit(index: Index, image_id: int, sims: np.ndarray, with_heat: bool) -> Hit:
    """A re-ranked result with its region box (and heat map) from its (m, slots) similarities."""
    grid = index.grid
    cells = None if index.patch_cells is None else index.patch_cells[image_id]
    covered = slot_cells(index.layout, grid, cells)  # exact grid cells of each stored slot
    box = match_box(index.size(image_id), grid, np.concatenate([covered[b] for b in sims.argmax(axis=1)]))
    heat = slots_to_grid(sims.max(axis=0), covered, grid) if with_heat else None
    return Hit(image_id, float(sims.max(axis=1).mean()), box, heat)


def match_box(size: tuple[int, int], grid: tuple[int, int], patches: np.ndarray) -> Box:
    """The box around the best-matching patches, ignoring the farthest-flung tenth on each side."""
    gw = grid[1]
    rows, cols = np.asarray(patches) // gw, np.asarray(patches) % gw
    r0, r1 = np.percentile(rows, [10, 90], method="nearest") if len(rows) > 4 else (rows.min(), rows.max())
    c0, c1 = np.percentile(cols, [10, 90], method="nearest") if len(cols) > 4 else (cols.min(), cols.max())
    w, h = size
    cell_w, cell_h = w / grid[1], h / grid[0]
    return (float(c0 * cell_w), float(r0 * cell_h), float((c1 + 1) * cell_w), float((r1 + 1) * cell_h))
