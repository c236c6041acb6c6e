from collections import Counter

import numpy as np
import pytest

from dino_demo.index import load_index
from dino_demo.index_writer import Writer
from dino_demo.model import Features
from dino_demo.geometry import Box, patches_in
from dino_demo.search import MAX_RESULTS, SearchError, match_box, search_image, search_region

GRID, DIM, COUNT = (4, 4), 16, 30
MODEL = {"id": "tiny", "revision": None, "type": "vit", "input_size": 64, "patch_size": 16, "dim": DIM, "grid": list(GRID)}


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(7)
    return unit(rng.standard_normal((COUNT, DIM))), unit(rng.standard_normal((COUNT, 16, DIM)))


@pytest.fixture(scope="module")
def index(tmp_path_factory, vectors):
    cls, patches = vectors
    writer = Writer(tmp_path_factory.mktemp("idx"), {"model": MODEL, "source": {}, "skip_faces": False, "thumb_size": 0})
    meta = [{"source_row": i, "width": 100 + i, "height": 80, "label": None, "thumbnail": None} for i in range(COUNT)]
    writer.add_chunk(0, COUNT, cls, patches, meta, Counter())
    writer.finalize({})
    return load_index(writer.out, MODEL)


def query(cls, patches, size=(64, 64)):
    return Features(cls[None], patches[None], GRID, [size])


def test_image_search_matches_brute_force(index, vectors):
    cls, patches = vectors
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = unit(rng.standard_normal(DIM))
        hits = search_image(index, query(q, patches[0]), k=7)
        exact = np.argsort(-(cls @ q))[:7]
        assert [h.id for h in hits] == exact.tolist()
        np.testing.assert_allclose([h.score for h in hits], (cls @ q)[exact], atol=1e-5)


def test_each_indexed_image_finds_itself_first(index, vectors):
    cls, patches = vectors
    for i in range(COUNT):
        hit = search_image(index, query(cls[i], patches[i]), k=1)[0]
        assert hit.id == i and hit.score == pytest.approx(1, abs=1e-5)


def exact_region_scores(patches_all, q_patches):
    """Brute force: for each image, the mean over query patches of the best similarity in it."""
    # float16 storage while building: compare with what the index holds
    stored = patches_all.astype(np.float16).astype(np.float32)
    return np.einsum("md,npd->nmp", q_patches, stored).max(axis=2).mean(axis=1)


@pytest.mark.parametrize("candidates", [200, 8])  # the whole index re-ranked; votes pick 8 of 30 first
def test_region_search_matches_brute_force(index, vectors, candidates):
    cls, patches = vectors
    rng = np.random.default_rng(2)
    q_patches = unit(rng.standard_normal((16, DIM)))
    box = (0, 0, 32, 48)  # the left half, top three quarters of a 64x64 query: 2 x 3 patches
    chosen = patches_in(Box(*box), (64, 64), GRID)
    assert chosen.tolist() == [0, 1, 4, 5, 8, 9]
    hits = search_region(index, query(cls[0], q_patches), box, k=5, candidates=candidates)
    exact = exact_region_scores(patches, q_patches[chosen])
    assert [h.id for h in hits] == np.argsort(-exact)[:5].tolist()
    np.testing.assert_allclose([h.score for h in hits], np.sort(exact)[::-1][:5], atol=1e-4)


def test_region_of_an_indexed_image_finds_that_image_and_the_same_place(index, vectors):
    cls, patches = vectors
    box = (16, 16, 48, 48)  # the central 2 x 2 patches
    hits = search_region(index, query(cls[3], patches[3], size=(64, 64)), box, k=3, with_heat=True)
    assert hits[0].id == 3 and hits[0].score == pytest.approx(1, abs=1e-3)
    w, h = index.size(3)  # the hit's own size, not the query's
    assert hits[0].box == pytest.approx((w / 4, h / 4, 3 * w / 4, 3 * h / 4))
    assert hits[0].heat.shape == GRID and hits[0].heat.max() == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("k", [0, -3, MAX_RESULTS + 1, 2.5, "5", True])
def test_k_outside_one_to_the_most_a_search_returns_is_refused(index, vectors, k):
    cls, patches = vectors
    with pytest.raises(SearchError, match=f"between 1 and {MAX_RESULTS}"):
        search_image(index, query(cls[0], patches[0]), k=k)
    with pytest.raises(SearchError, match=f"between 1 and {MAX_RESULTS}"):
        search_region(index, query(cls[0], patches[0]), (0, 0, 64, 64), k=k)


def test_k_beyond_the_collection_returns_every_image_once(index, vectors):
    cls, patches = vectors
    hits = search_image(index, query(cls[0], patches[0]), k=MAX_RESULTS)
    assert sorted(h.id for h in hits) == list(range(COUNT))
    region = search_region(index, query(cls[0], patches[0]), (0, 0, 64, 64), k=float(MAX_RESULTS))
    assert sorted(h.id for h in region) == list(range(COUNT))


def test_match_box_surrounds_the_matched_patches():
    assert match_box((400, 200), (4, 4), np.array([5, 6, 9, 10])) == (100, 50, 300, 150)
    # one stray match far away does not blow the box up to the whole image
    many = np.array([5] * 10 + [6] * 10 + [15])
    assert match_box((400, 200), (4, 4), many) == (100, 50, 300, 100)


def reduced_index(folder, vectors, patches):
    cls, all_patches = vectors
    writer = Writer(folder, {"model": MODEL, "source": {}, "skip_faces": False, "thumb_size": 0, "patches": patches})
    meta = [{"source_row": i, "width": 100 + i, "height": 80, "label": None, "thumbnail": None} for i in range(COUNT)]
    writer.add_chunk(0, COUNT, cls, all_patches, meta, Counter())
    writer.finalize({})
    return load_index(folder, MODEL)


def test_pooled_region_search_finds_the_image_and_boxes_the_pooled_block(tmp_path, vectors):
    cls, patches = vectors
    index = reduced_index(tmp_path / "idx", vectors, {"mode": "pooled", "keep": 0})
    assert index.patches_per_image == 4 and index.patch_index.ntotal == 4 * COUNT
    hits = search_region(index, query(cls[3], patches[3]), (0, 0, 32, 32), k=3, with_heat=True)  # cells 0, 1, 4, 5
    w, h = index.size(3)
    assert hits[0].id == 3 and hits[0].box == pytest.approx((0, 0, w / 2, h / 2))
    assert hits[0].heat.shape == GRID and hits[0].heat[0, 0] == hits[0].heat.max()


def test_salient_region_search_finds_the_image_and_boxes_the_kept_cell(tmp_path, vectors):
    cls, patches = vectors
    index = reduced_index(tmp_path / "idx", vectors, {"mode": "salient", "keep": 4})
    assert index.patches_per_image == 4 and index.segments[0].cells.shape == (COUNT, 4)
    cell = int(index.cells(5)[1])  # a patch image 5 kept
    r, c = divmod(cell, GRID[1])
    box = (c * 16 + 4, r * 16 + 4, c * 16 + 12, r * 16 + 12)  # inside that patch of a 64x64 query
    hits = search_region(index, query(cls[5], patches[5]), box, k=3)
    w, h = index.size(5)
    assert hits[0].id == 5 and hits[0].score == pytest.approx(1, abs=1e-3)
    assert hits[0].box == pytest.approx((c * w / 4, r * h / 4, (c + 1) * w / 4, (r + 1) * h / 4))
