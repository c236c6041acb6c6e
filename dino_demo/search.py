"""Image retrieval and region retrieval over an index folder.

Region search: the patches under the user's box each search `patches.faiss`; hits vote for
their image; the best candidates are re-ranked exactly on all their patches, so a compressed
patch index only has to find candidates, never to rank them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .geometry import Box, Grid, Size, cells_box, fit_box, patches_in
from .index import Index
from .model import Features
from .patch_select import slot_cells, slots_to_grid

MAX_RESULTS = 1000  # the most results any one search returns; the app's own limit (max_k) is lower


class SearchError(UserError):
    """A query that cannot be answered as asked (empty box, k out of range...)."""


@dataclass
class Hit:
    """One result: an indexed image, how similar it is, and for regions where the match lies."""

    id: int
    score: float  # cosine similarity (image search) or mean best-patch cosine (region search)
    box: Box | None = None  # matching region in the hit's original pixels
    heat: np.ndarray | None = None  # (gh, gw) best similarity of each hit patch to the region


def check_k(k, limit: int = MAX_RESULTS) -> int:
    """k as an int, refused with a clear message unless it is a whole number from 1 to `limit`."""
    if isinstance(k, float) and k.is_integer():
        k = int(k)  # sliders and JSON send 5.0
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise SearchError(f"The number of results must be between 1 and {limit} (got {k}).")
    return int(k)


def search_image(index: Index, features: Features, k: int = 10) -> list[Hit]:
    """The k indexed images whose CLS vectors are closest to the query's (image 0 of `features`)."""
    k = min(check_k(k), index.count)
    scores, ids = index.global_index.search(features.cls[:1], k)
    return [Hit(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]


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
    box = fit_box(box, features.sizes[0])
    query = features.patches[0, patches_in(box, features.sizes[0], features.grid)]  # (m, d)
    candidates = max(candidates, k)
    # An index no larger than the candidate list is re-ranked whole: no votes needed.
    ranked = index.live_ids().tolist() if index.count <= candidates else _candidates(index, query, per_patch)[:candidates]
    if not ranked:
        return []
    stored = index.patches_of(ranked)  # (candidates, slots, d)
    sims = (stored.reshape(-1, stored.shape[2]) @ query.T).reshape(len(ranked), stored.shape[1], len(query))
    sims = sims.transpose(0, 2, 1)  # (candidates, m, slots): one matrix product, not einsum's loops
    # Exact score of each candidate: mean over query patches of their best similarity in it.
    best = np.argsort(-sims.max(axis=2).mean(axis=1), kind="stable")[:k]
    return [_hit(index, ranked[i], sims[i], with_heat) for i in best]


def _candidates(index: Index, query: np.ndarray, per_patch: int) -> list[int]:
    """Image ids ordered by votes: the sum over query patches of each image's best hit."""
    scores, ids = index.patch_index.search(query, min(per_patch, index.patch_index.ntotal))  # (m, per_patch)
    found = ids >= 0
    which = np.broadcast_to(np.arange(len(query))[:, None], ids.shape)[found]
    images, slot = np.unique(ids[found] // index.patches_per_image, return_inverse=True)
    best = np.zeros((len(images), len(query)), np.float32)  # an image's best score per query patch
    np.maximum.at(best, (slot, which), scores[found])
    return images[np.argsort(-best.sum(axis=1), kind="stable")].tolist()


def _hit(index: Index, image_id: int, sims: np.ndarray, with_heat: bool) -> Hit:
    """A re-ranked result with its region box (and heat map) from its (m, slots) similarities."""
    grid = index.grid
    covered = slot_cells(index.layout, grid, index.cells(image_id))  # exact grid cells of each stored slot
    box = match_box(index.size(image_id), grid, np.concatenate([covered[b] for b in sims.argmax(axis=1)]))
    heat = slots_to_grid(sims.max(axis=0), covered, grid) if with_heat else None
    return Hit(image_id, float(sims.max(axis=1).mean()), box, heat)


def match_box(size: Size, grid: Grid, patches: np.ndarray) -> Box:
    """The box around the best-matching patches, ignoring the farthest-flung tenth on each side."""
    rows, cols = np.divmod(np.asarray(patches), grid[1])
    r0, r1 = np.percentile(rows, [10, 90], method="nearest") if len(rows) > 4 else (rows.min(), rows.max())
    c0, c1 = np.percentile(cols, [10, 90], method="nearest") if len(cols) > 4 else (cols.min(), cols.max())
    return cells_box(size, grid, (int(r0), int(r1)), (int(c0), int(c1)))
