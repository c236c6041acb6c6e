import numpy as np
import pytest

from conftest import make_image
from dino_demo.matching import match_patches
from dino_demo.model import Features

GRID = (4, 4)


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def features(patches, size=(80, 40)):
    return Features(np.zeros((1, patches.shape[1]), np.float32), patches[None], GRID, [size])


def brute_force_mutual(a, b):
    sims = a @ b.T
    return {(i, int(sims[i].argmax())) for i in range(len(a)) if int(sims[:, sims[i].argmax()].argmax()) == i}


def test_mutual_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = unit(rng.standard_normal((16, 8))), unit(rng.standard_normal((16, 8)))
        matches = match_patches(features(a), features(b))
        assert set(zip(matches.a.tolist(), matches.b.tolist())) == brute_force_mutual(a, b)
        assert np.all(np.diff(matches.scores) <= 0)  # strongest first
        np.testing.assert_allclose(matches.scores, (a @ b.T)[matches.a, matches.b], atol=1e-6)


def test_a_shuffled_grid_is_matched_back_to_its_places():
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal((16, 32)))
    order = rng.permutation(16)
    noisy = unit(a[order] + 0.05 * rng.standard_normal((16, 32)))
    matches = match_patches(features(a, (80, 40)), features(noisy, (40, 80)))
    assert len(matches) == 16
    assert all(order[j] == i for i, j in zip(matches.a, matches.b))
    # points are patch centres in each image's own pixels
    i, j = matches.a[0], matches.b[0]
    assert matches.points_a[0].tolist() == [(i % 4) * 20 + 10, (i // 4) * 10 + 5]
    assert matches.points_b[0].tolist() == [(j % 4) * 10 + 5, (j // 4) * 20 + 10]


def test_a_box_on_image_a_restricts_the_matches_to_it():
    rng = np.random.default_rng(2)
    a = unit(rng.standard_normal((16, 32)))
    matches = match_patches(features(a), features(a.copy()), box=(0, 0, 40, 20))  # top-left quarter
    assert sorted(matches.a.tolist()) == [0, 1, 4, 5]
    assert matches.box == (0, 0, 40, 20)
    assert np.all(matches.points_a[:, 0] <= 40) and np.all(matches.points_a[:, 1] <= 20)


def test_top_keeps_the_strongest_and_the_mean_is_reported():
    rng = np.random.default_rng(3)
    a, b = unit(rng.standard_normal((16, 4))), unit(rng.standard_normal((16, 4)))
    matches = match_patches(features(a), features(b))
    top = matches.top(2)
    assert len(top) == min(2, len(matches)) and top.scores.tolist() == matches.scores[:2].tolist()
    assert matches.mean_score == pytest.approx(float(matches.scores.mean()))


def test_the_same_image_twice_matches_every_patch_to_itself(embedder):
    image = make_image(9, (120, 90))
    f = embedder.embed([image])
    matches = match_patches(f, f)
    assert len(matches) == 16 and np.array_equal(matches.a, matches.b)
    np.testing.assert_allclose(matches.scores, 1, atol=1e-5)
