"""Boxes and patch grids, checked against brute force: pixel counting and loops over cells."""
from __future__ import annotations

import numpy as np
import pytest

from dino_demo.geometry import (Box, BoxError, cell_size, cells_box, fit_box, patch_boxes, patch_centres,
                                patches_in)

GRID = (4, 4)


def pixel_mask(box, size=(64, 48)) -> np.ndarray:
    """Brute force: which pixel centres of a size image a box holds."""
    xs, ys = np.meshgrid(np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5)
    return (xs >= box[0]) & (xs < box[2]) & (ys >= box[1]) & (ys < box[3])


def random_int_boxes(rng, n, size=(64, 48)):
    for _ in range(n):
        x0, x1 = sorted(rng.integers(0, size[0] + 1, 2))
        y0, y1 = sorted(rng.integers(0, size[1] + 1, 2))
        yield Box(float(x0), float(y0), float(x1), float(y1))


def test_box_area_intersection_and_overlap_agree_with_counting_pixels():
    rng = np.random.default_rng(0)
    boxes = list(random_int_boxes(rng, 60))
    for a, b in zip(boxes[::2], boxes[1::2]):
        assert a.area == pixel_mask(a).sum()
        shared = (pixel_mask(a) & pixel_mask(b)).sum()
        assert a.intersection(b) == shared == b.intersection(a)
        smaller = min(pixel_mask(a).sum(), pixel_mask(b).sum())
        assert a.overlap(b) == (shared / smaller if smaller else 1.0)


def test_a_box_unpacks_and_compares_as_a_plain_tuple():
    box = Box(1, 2, 3, 4)
    x0, y0, x1, y1 = box
    assert (x0, y0, x1, y1) == (1, 2, 3, 4) == box and list(box) == [1, 2, 3, 4]
    assert box.centre == (2, 3) and box.width == 2 and box.height == 2


def test_scaling_a_box_moves_it_to_the_same_place_in_a_resized_copy():
    assert Box(100, 50, 300, 150).scaled((400, 200), (200, 100)) == (50, 25, 150, 75)
    rng = np.random.default_rng(1)
    for box in random_int_boxes(rng, 20):
        there_and_back = box.scaled((64, 48), (37, 91)).scaled((37, 91), (64, 48))
        np.testing.assert_allclose(there_and_back, box, atol=1e-9)


def test_rounding_out_keeps_every_pixel_of_the_box_and_stays_in_the_image():
    rng = np.random.default_rng(2)
    for _ in range(50):
        x0, x1 = sorted(rng.uniform(-10, 74, 2))
        y0, y1 = sorted(rng.uniform(-10, 58, 2))
        box = Box(x0, y0, x1, y1)
        out = box.rounded_out((64, 48))
        assert all(float(v).is_integer() for v in out)
        assert 0 <= out.x0 <= max(0, x0) and out.x1 >= min(64, x1) and out.x1 <= 64
        assert 0 <= out.y0 <= max(0, y0) and out.y1 >= min(48, y1) and out.y1 <= 48


@pytest.mark.parametrize("box", [(10, 10, 10, 40), (200, 200, 300, 300), None, (1, 2, 3)])
def test_boxes_without_area_in_the_image_are_refused(box):
    with pytest.raises(BoxError):
        fit_box(box, (64, 64))


def test_inverted_and_overflowing_boxes_are_ordered_and_clipped():
    assert fit_box((50, 60, 10, 5), (64, 64)) == (10, 5, 50, 60)
    assert fit_box((-20, 10, 100, 30), (64, 64)) == (0, 10, 64, 30)
    assert isinstance(fit_box([1, 2, 30, 40], (64, 64)), Box)


@pytest.mark.parametrize("size", [(64, 64), (97, 31), (31, 97), (640, 480), (1, 1), (10000, 100)])
def test_patch_boxes_tile_the_original_image_exactly(size):
    grid = (4, 6)
    boxes = patch_boxes(size, grid).astype(np.float64)
    w, h = size
    assert boxes.shape == (24, 4)
    assert np.isclose((boxes[:, 2] - boxes[:, 0]) @ (boxes[:, 3] - boxes[:, 1]), w * h, rtol=1e-5)
    grid_boxes = boxes.reshape(4, 6, 4)
    np.testing.assert_allclose(grid_boxes[:, 0, 0], 0)
    np.testing.assert_allclose(grid_boxes[:, -1, 2], w, rtol=1e-6)
    np.testing.assert_allclose(grid_boxes[0, :, 1], 0)
    np.testing.assert_allclose(grid_boxes[-1, :, 3], h, rtol=1e-6)
    np.testing.assert_array_equal(grid_boxes[:, 1:, 0], grid_boxes[:, :-1, 2])  # neighbours share edges
    np.testing.assert_array_equal(grid_boxes[1:, :, 1], grid_boxes[:-1, :, 3])


def test_cells_and_centres_agree_with_a_loop_over_the_grid():
    size, grid = (100, 50), (2, 4)
    cw, ch = cell_size(size, grid)
    assert (cw, ch) == (25, 25)
    for cell, (box, centre) in enumerate(zip(patch_boxes(size, grid), patch_centres(size, grid))):
        r, c = divmod(cell, grid[1])
        assert box.tolist() == [c * cw, r * ch, (c + 1) * cw, (r + 1) * ch]
        assert centre.tolist() == [(c + 0.5) * cw, (r + 0.5) * ch]
        assert cells_box(size, grid, (r, r), (c, c)) == tuple(box.tolist())
    assert cells_box(size, grid, (0, 1), (1, 2)) == (25, 0, 75, 50)


def test_patches_in_a_box_are_those_whose_centre_it_holds():
    rng = np.random.default_rng(3)
    size, grid = (64, 48), (3, 4)
    centres = patch_centres(size, grid)
    for box in random_int_boxes(rng, 40, size):
        expected = [i for i, (x, y) in enumerate(centres) if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1]
        if expected:
            assert patches_in(box, size, grid).tolist() == expected


def test_a_box_smaller_than_a_patch_takes_the_patch_it_covers_most():
    assert patches_in(Box(20, 40, 22, 42), (64, 64), GRID).tolist() == [9]
    assert patches_in(Box(14, 0, 20, 3), (64, 64), GRID).tolist() == [1]  # 2 px in cell 0, 4 in cell 1


@pytest.mark.parametrize("turn, transpose", [(0, None), (90, "ROTATE_90"), (180, "ROTATE_180"), (270, "ROTATE_270")])
def test_a_box_found_in_a_turned_copy_turns_back_onto_the_same_pixels(turn, transpose):
    from PIL import Image

    size = (64, 48)
    for box in random_int_boxes(np.random.default_rng(4), 10, size):
        if box.area == 0:
            continue
        mask = Image.fromarray(pixel_mask(box, size).astype(np.uint8) * 255)
        turned = mask if transpose is None else mask.transpose(getattr(Image.Transpose, transpose))
        found = Box(*turned.getbbox())  # brute force: where the pixels went
        assert found.turned_back(turn, size) == box
