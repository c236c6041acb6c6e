"""Which parts of two images match: mutual nearest neighbours ("best buddies") between patch grids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Box, fit_box, patch_centres, patches_in
from .model import Features

MATCH_LINES = 40  # match lines drawn when a caller does not say how many


@dataclass
class Matches:
    """Matched patch pairs between image A and image B, strongest first."""

    a: np.ndarray  # (m,) patch indices in A
    b: np.ndarray  # (m,) patch indices in B
    scores: np.ndarray  # (m,) cosine similarity of each pair
    points_a: np.ndarray  # (m, 2) patch centres (x, y) in A's original pixels
    points_b: np.ndarray  # (m, 2) patch centres (x, y) in B's original pixels
    box: Box | None  # the box on A that restricted the matches, if any
    grid: tuple[int, int] | None = None  # (rows, cols) of both images' patch grid: the input size's

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def mean_score(self) -> float:
        return float(self.scores.mean()) if len(self.scores) else 0.0

    def top(self, n: int) -> "Matches":
        """The n strongest matches."""
        n = max(0, int(n))
        return Matches(self.a[:n], self.b[:n], self.scores[:n], self.points_a[:n], self.points_b[:n], self.box, self.grid)


def match_patches(a: Features, b: Features, box=None) -> Matches:
    """Mutual nearest neighbours between the patches of image 0 of `a` and image 0 of `b`.

    With `box` (in A's pixels), only A's patches under the box take part.
    """
    size_a, size_b = a.sizes[0], b.sizes[0]
    chosen = np.arange(a.patches.shape[1])
    if box is not None:
        box = fit_box(box, size_a)
        chosen = patches_in(box, size_a, a.grid)
    sims = a.patches[0, chosen] @ b.patches[0].T  # (m, pb)
    a_to_b = sims.argmax(axis=1)
    b_to_a = sims.argmax(axis=0)
    mutual = np.flatnonzero(b_to_a[a_to_b] == np.arange(len(chosen)))
    scores = sims[mutual, a_to_b[mutual]]
    order = np.argsort(-scores, kind="stable")
    ia, ib = chosen[mutual[order]], a_to_b[mutual[order]]
    return Matches(ia, ib, scores[order], patch_centres(size_a, a.grid)[ia], patch_centres(size_b, b.grid)[ib], box,
                   tuple(a.grid))
