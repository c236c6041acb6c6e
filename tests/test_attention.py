"""What DINO sees: masks by attention mass, run lengths, parts, principal-component colours, co-segmentation."""
from __future__ import annotations

import numpy as np
import pytest

from dino_demo.attention import (components, co_segment, fit_basis, look, mask_json, mass_mask, otsu_threshold,
                                 pixel_mask, run_lengths)
from dino_demo.model import Attended, Features


def dino_mask(attention: np.ndarray, share: float) -> np.ndarray:
    """DINO's visualize_attention.py, line by line: sort ascending, normalise, keep where the cumulative
    mass passes 1 - share."""
    flat = attention.ravel()
    idx = np.argsort(flat, kind="stable")
    val = flat[idx] / flat.sum()
    keep = np.cumsum(val) > (1 - share)
    mask = np.zeros(flat.size, bool)
    mask[idx] = keep
    return mask.reshape(attention.shape)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO's uncompressed RLE back to an (h, w) mask, the slow obvious way."""
    h, w = rle["size"]
    flat, value, at = np.zeros(h * w, bool), False, 0
    for count in rle["counts"]:
        flat[at:at + count] = value
        at, value = at + count, not value
    assert at == h * w
    return flat.reshape(w, h).T  # column by column


@pytest.mark.parametrize("share", [0.1, 0.3, 0.6, 0.9])
def test_the_mask_keeps_the_patches_dino_keeps(share):
    rng = np.random.default_rng(1)
    for _ in range(20):
        attention = rng.gamma(0.5, size=(14, 14))  # a few strong patches, many weak ones, as real maps are
        np.testing.assert_array_equal(mass_mask(attention, share), dino_mask(attention, share))


def test_the_mask_holds_at_least_the_share_and_drops_no_stronger_patch():
    attention = np.random.default_rng(2).random((8, 8))
    mask = mass_mask(attention, 0.5)
    assert attention[mask].sum() >= 0.5 * attention.sum()
    assert attention[mask].min() >= attention[~mask].max()
    assert attention[mask].sum() - attention[mask].min() < 0.5 * attention.sum()  # and is the fewest such


@pytest.mark.parametrize("size", [(64, 48), (97, 53), (7, 5), (1000, 3)])
def test_run_lengths_decode_to_the_mask_drawn_at_the_images_pixels(size):
    rng = np.random.default_rng(size[0])
    cells = rng.random((6, 5)) < 0.4
    rle = run_lengths(cells, size)
    assert rle["size"] == [size[1], size[0]]
    np.testing.assert_array_equal(decode_rle(rle), pixel_mask(cells, size))


def test_run_lengths_start_with_zero_when_the_first_pixel_is_in_the_mask():
    cells = np.ones((2, 2), bool)
    assert run_lengths(cells, (4, 4))["counts"] == [0, 16]
    assert run_lengths(~cells, (4, 4))["counts"] == [16]


def test_each_pixel_belongs_to_the_cell_under_its_centre():
    cells = np.zeros((2, 3), bool)
    cells[1, 2] = True
    mask = pixel_mask(cells, (30, 20))  # cells of 10 x 10 pixels
    assert mask.sum() == 100 and mask[10:, 20:].all()


def test_parts_are_the_8_connected_pieces_largest_first():
    cells = np.zeros((6, 6), bool)
    cells[0, 0] = True  # alone
    cells[2:5, 2:4] = True  # a block of 6
    cells[5, 4] = True  # touches the block diagonally: the same part
    parts = components(cells)
    assert [int(p.sum()) for p in parts] == [7, 1]
    assert parts[1][0, 0] and not (parts[0] & parts[1]).any()
    np.testing.assert_array_equal(parts[0] | parts[1], cells)


def test_mask_json_gives_each_parts_box_share_and_pixels():
    cells = np.zeros((5, 5), bool)
    cells[1:3, 1:3] = True
    cells[4, 4] = True
    out = mask_json(cells, (100, 50))  # cells of 20 x 10 pixels
    assert out["share"] == pytest.approx(5 / 25, abs=1e-4)
    assert out["box"] == [20.0, 10.0, 100.0, 50.0]
    big, small = out["components"]
    assert big["box"] == [20.0, 10.0, 60.0, 30.0] and big["share"] == 0.16
    assert small["box"] == [80.0, 40.0, 100.0, 50.0] and small["share"] == 0.04
    np.testing.assert_array_equal(decode_rle(big["rle"]) | decode_rle(small["rle"]), pixel_mask(cells, (100, 50)))
    assert mask_json(np.zeros((2, 2), bool), (8, 8)) == {"share": 0.0, "box": None, "components": []}


def test_otsu_splits_two_groups_between_them_as_brute_force_does():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 300), rng.normal(6, 1, 100)])
    cut = otsu_threshold(values)
    candidates = np.sort(values)
    def spread(t):  # within-group variance, weighted: what Otsu minimises
        low, high = values[values <= t], values[values > t]
        return low.size * low.var() + high.size * high.var()
    best = min(candidates[:-1], key=spread)
    assert spread(cut) == pytest.approx(spread(best))
    assert 1.5 < cut < 4.5


def test_the_basis_is_the_principal_axes_and_refits_to_the_same_colours():
    rng = np.random.default_rng(4)
    data = rng.normal(size=(500, 3)) * [5.0, 2.0, 0.5] @ np.linalg.qr(rng.normal(size=(3, 3)))[0] + 7
    data = np.concatenate([data, rng.normal(size=(500, 5)) * 0.01], axis=1)
    basis = fit_basis(data, 3)
    covariance = np.cov(data.T)
    values, vectors = np.linalg.eigh(covariance)
    for axis, vector in zip(basis.axes, vectors.T[::-1][:3]):
        assert abs(axis @ vector) == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(fit_basis(data[::-1].copy(), 3).colours(data), basis.colours(data), atol=1e-5)
    colours = basis.colours(data)
    assert colours.min() == 0 and colours.max() == 1


def planted(n: int = 1, grid=(8, 8), d: int = 16, seed: int = 5):
    """Features of n images each showing one object of four parts (the quadrants of a 4 x 4 square of patches,
    at a different place in each image) on a plain ground, with the attention on the object."""
    rng = np.random.default_rng(seed)
    parts, ground = rng.normal(size=(4, d)), rng.normal(size=d)
    patches = np.empty((n, grid[0] * grid[1], d), np.float32)
    attention = np.full((n, 2, *grid), 0.1, np.float32)
    labels = []
    for i in range(n):
        label = np.full(grid, -1)
        for q, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
            label[i + r:i + r + 2, 2 * i + c:2 * i + c + 2] = q
        labels.append(label)
        kinds = np.concatenate([parts, ground[None]])[label.ravel()]  # -1 picks the ground
        patches[i] = kinds + rng.normal(0, 0.05, kinds.shape)
        attention[i][:, label >= 0] = 5.0
    patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
    return Attended(Features(patches[:, 0], patches, grid, [(80, 80)] * n), attention), labels


def part_colours(colours: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(4, 3) the mean colour of each part."""
    return np.stack([colours[label == q].mean(axis=0) for q in range(4)])


def test_look_finds_the_planted_object_in_mask_and_colours():
    attended, (label,) = planted()
    sight = look(attended, 90)[0]
    np.testing.assert_array_equal(sight.mask, label >= 0)  # 16 x 5.0 of 16 x 5.0 + 48 x 0.1: 94% of the mass
    np.testing.assert_array_equal(sight.foreground, label >= 0)
    assert look(attended, 50)[0].mask.sum() == 9  # half of 84.8 needs 9 of the object's patches
    assert sight.heads.shape == (2, 8, 8) and sight.heads.sum(axis=(1, 2)) == pytest.approx([1, 1])
    colours = part_colours(sight.colours, label)
    assert 0 <= sight.colours.min() and sight.colours.max() <= 1
    distances = np.abs(colours[:, None] - colours[None]).max(axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0.2  # each part has its own colour


def test_one_basis_for_every_frame_gives_a_part_the_same_colour_in_each():
    attended, labels = planted(n=3)
    sights = look(attended, 60)
    colours = [part_colours(s.colours, label) for s, label in zip(sights, labels)]
    for other in colours[1:]:
        np.testing.assert_allclose(other, colours[0], atol=0.1)
    for sight, label in zip(sights, labels):
        np.testing.assert_array_equal(sight.foreground, label >= 0)


def test_co_segmentation_colours_the_shared_parts_alike_and_leaves_the_rest_out():
    rng = np.random.default_rng(6)
    grid, d = (6, 6), 24
    shared, only_a, only_b = rng.normal(size=(4, d)), rng.normal(size=d), rng.normal(size=d)
    cells = grid[0] * grid[1]
    where_a, where_b = [7, 8, 13, 14], [20, 21, 26, 27]  # part q of the shared thing lies at where_x[q]
    a, b = np.tile(only_a, (cells, 1)), np.tile(only_b, (cells, 1))
    a[where_a], b[where_b] = shared, shared
    a, b = (x + rng.normal(0, 0.05, x.shape) for x in (a, b))
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    features = [Features(x[:1], x[None].astype(np.float32), grid, [(60, 60)]) for x in (a, b)]
    parts = co_segment(*features)
    assert set(np.flatnonzero(parts.agree[0])) == set(where_a)
    assert set(np.flatnonzero(parts.agree[1])) == set(where_b)
    np.testing.assert_allclose(parts.colours[0].reshape(-1, 3)[where_a], parts.colours[1].reshape(-1, 3)[where_b],
                               atol=0.1)
    out = parts.to_json()["images"]
    assert out[0]["mask"]["share"] == pytest.approx(4 / 36, abs=1e-3)
