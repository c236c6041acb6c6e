"""Boxes and patch grids: the one place where pixels, grid cells and boxes are turned into each other.

Every image is resized to a square model input (model.py), so an image of W x H pixels with a
(gh, gw) patch grid has cells of W/gw x H/gh pixels, and cell (r, c) covers exactly
[c*W/gw, (c+1)*W/gw) x [r*H/gh, (r+1)*H/gh): the cells tile the image with no gap or overlap.
Cells are numbered row-major (r * gw + c), as the model's patch tokens are.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .errors import UserError

Size = tuple[int, int]  # (width, height) in pixels
Grid = tuple[int, int]  # (rows, columns) of patches


class BoxError(UserError):
    """A box that cannot be used (missing, or with no area inside its image)."""


class Box(NamedTuple):
    """(x0, y0, x1, y1) in an image's own pixels; a tuple, so it unpacks and serialises as one."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def intersection(self, other: "Box") -> float:
        """Area the two boxes share."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, w) * max(0.0, h)

    def overlap(self, other: "Box") -> float:
        """Shared area as a fraction of the smaller box (1.0 when either has no area)."""
        smaller = min(self.area, other.area)
        return self.intersection(other) / smaller if smaller > 0 else 1.0

    def scaled(self, from_size: Size, to_size: Size) -> "Box":
        """The same place in a copy of the image resized from `from_size` to `to_size`."""
        sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy)

    def turned_back(self, turn: int, size: Size) -> "Box":
        """A box found in a copy of a `size` image turned `turn` degrees counter-clockwise (PIL's
        ROTATE_90/180/270), in the unturned image's pixels."""
        w, h = size
        corners = {0: lambda x, y: (x, y), 90: lambda x, y: (w - y, x), 180: lambda x, y: (w - x, h - y),
                   270: lambda x, y: (y, h - x)}[turn % 360]
        (ax, ay), (bx, by) = corners(self.x0, self.y0), corners(self.x1, self.y1)
        return Box(min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))

    def rounded_out(self, size: Size) -> "Box":
        """Whole pixels that contain the box, clipped to a `size` image."""
        w, h = size
        return Box(max(0, math.floor(self.x0)), max(0, math.floor(self.y0)),
                   min(w, math.ceil(self.x1)), min(h, math.ceil(self.y1)))


def fit_box(box, size: Size) -> Box:
    """Order the corners of `box` (any 4 numbers) and clip it to the image; refuse one with no area in it."""
    if box is None or len(box) != 4:
        raise BoxError("Draw a box on the image first: drag with the mouse over the region to search.")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    w, h = size
    fitted = Box(max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
    if fitted.width < 1 or fitted.height < 1:
        raise BoxError(
            f"The box ({tuple(box)}) has no area inside the {w}x{h} image; drag out a larger box over the region."
        )
    return fitted


def cell_size(size: Size, grid: Grid) -> tuple[float, float]:
    """(width, height) in pixels of one grid cell of a `size` image."""
    return size[0] / grid[1], size[1] / grid[0]


def cells_box(size: Size, grid: Grid, rows: tuple[int, int], cols: tuple[int, int]) -> Box:
    """The pixel box of the cells in rows r0..r1 and columns c0..c1 (inclusive)."""
    cw, ch = cell_size(size, grid)
    return Box(float(cols[0] * cw), float(rows[0] * ch), float((cols[1] + 1) * cw), float((rows[1] + 1) * ch))


def patch_boxes(size: Size, grid: Grid) -> np.ndarray:
    """(gh*gw, 4) float32 boxes (x0, y0, x1, y1) of every cell, row-major, tiling the image exactly."""
    gh, gw = grid
    xs = np.arange(gw + 1, dtype=np.float64) * (size[0] / gw)
    ys = np.arange(gh + 1, dtype=np.float64) * (size[1] / gh)
    x0, y0 = np.meshgrid(xs[:-1], ys[:-1])
    x1, y1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([x0, y0, x1, y1], axis=-1).reshape(-1, 4).astype(np.float32)


def patch_centres(size: Size, grid: Grid) -> np.ndarray:
    """(gh*gw, 2) float32 centres (x, y) of every cell, row-major."""
    boxes = patch_boxes(size, grid)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def patches_in(box: Box, size: Size, grid: Grid) -> np.ndarray:
    """Cells whose centre lies in `box`; the cell covering most of it when no centre does."""
    x0, y0, x1, y1 = box
    cx, cy = patch_centres(size, grid).T
    inside = np.flatnonzero((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1))
    if inside.size:
        return inside
    boxes = patch_boxes(size, grid)
    overlap_w = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
    overlap_h = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
    return np.array([int(np.argmax(overlap_w * overlap_h))])
