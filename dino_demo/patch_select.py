"""Which patch vectors an index stores per image: all of them, 2x2-pooled, or the salient few.

Storing all 196 patches of 5M images is ~1e9 vectors; pooling keeps a quarter, `salient` keeps the
N patches most like the image's CLS vector. Each stored vector ("slot") keeps the exact grid cells
it covers, so a result's region box is still drawn in exact pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import UserError

MODES = ("all", "pooled", "salient")


@dataclass(frozen=True)
class PatchLayout:
    """How an index reduces an image's (gh, gw) patch grid to the slots it stores."""

    mode: str = "all"  # all | pooled | salient
    keep: int = 0  # slots per image for `salient`

    @classmethod
    def parse(cls, text: str) -> "PatchLayout":
        """'all', 'pooled', 'salient' (16 slots) or 'salient:N'."""
        mode, _, keep = text.partition(":")
        if mode not in MODES or (keep and (mode != "salient" or not keep.isdigit() or int(keep) < 1)):
            raise UserError(f"--patches {text!r} is not one of all, pooled, salient or salient:N (N >= 1).")
        return cls(mode, int(keep or 16) if mode == "salient" else 0)

    def describe(self) -> dict:
        return {"mode": self.mode, "keep": self.keep}

    def slots(self, grid: tuple[int, int]) -> int:
        """Stored vectors per image."""
        if self.mode == "pooled":
            return len(pooled_cells(grid))
        if self.mode == "salient":
            return min(self.keep, grid[0] * grid[1])
        return grid[0] * grid[1]


def layout_of(description: dict | None) -> PatchLayout:
    """The layout recorded in a manifest or build description; none recorded means all patches."""
    return PatchLayout(**description) if description else PatchLayout()


@lru_cache(maxsize=8)  # asked for every re-ranked candidate
def pooled_cells(grid: tuple[int, int]) -> list[np.ndarray]:
    """Per pooled slot, row-major, the original cells of its 2x2 block (1x2/2x1/1x1 at odd edges)."""
    gh, gw = grid
    return [np.array([r * gw + c for r in range(r0, min(r0 + 2, gh)) for c in range(c0, min(c0 + 2, gw))])
            for r0 in range(0, gh, 2) for c0 in range(0, gw, 2)]


def reduce_patches(layout: PatchLayout, cls: np.ndarray, patches: np.ndarray, grid: tuple[int, int]):
    """(n, slots, d) L2-normalised stored vectors and, for `salient`, (n, slots) int16 cells kept."""
    if layout.mode == "pooled":
        pooled = np.stack([patches[:, cells].mean(axis=1) for cells in pooled_cells(grid)], axis=1)
        return _unit(pooled), None
    if layout.mode == "salient":
        # Similarity to CLS stands in for CLS attention: no second (eager) forward pass is needed.
        saliency = np.einsum("npd,nd->np", patches, cls)
        cells = np.sort(np.argsort(-saliency, axis=1, kind="stable")[:, : layout.slots(grid)], axis=1)
        return np.take_along_axis(patches, cells[..., None], axis=1), cells.astype(np.int16)
    return patches, None


def slot_cells(layout: PatchLayout, grid: tuple[int, int], cells: np.ndarray | None) -> list[np.ndarray]:
    """For one image, the original grid cells each slot covers (`cells`: its salient cells)."""
    if layout.mode == "pooled":
        return pooled_cells(grid)
    if layout.mode == "salient":
        return [np.array([int(c)]) for c in cells]
    return [np.array([c]) for c in range(grid[0] * grid[1])]


def slots_to_grid(values: np.ndarray, covered: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) map of per-slot `values`; cells no slot covers get the lowest value."""
    out = np.full(grid[0] * grid[1], float(values.min()), np.float32)
    for value, cells in zip(values, covered):
        out[cells] = value
    return out.reshape(grid)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
