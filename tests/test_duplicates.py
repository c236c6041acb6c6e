"""Near-duplicate groups: on synthetic vectors written by the real writer (one segment, or a build plus
an addition), and on real images through the tiny model, the groups are the connected components of
the brute-force all-pairs cosine graph; removed images never appear; the CLI prints and writes them.
The default threshold is calibrated on the index: just above the highest cosine of any edited copy to
an image other than its original, computed here again by brute force over the index's vectors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_demo.duplicates import (THRESHOLD_FLOOR, DuplicateGroup, calibrate_threshold, find_duplicate_groups,
                                  load_thumbnail, threshold_above)
from dino_demo.errors import UserError
from dino_demo.images import make_thumbnail
from dino_demo.index import load_index
from dino_demo.index_update import remove_images
from dino_demo.index_writer import Writer, now
from index_builder.__main__ import main
from index_builder.duplicates import copy_maker

DIM = 16
MODEL = {"id": "facebook/dino-vits16", "revision": None, "type": "vit", "input_size": 32,
         "patch_size": 16, "dim": DIM, "grid": [2, 2]}
SOURCE = {"dataset": "/data/first", "split": "train", "revision": None, "image_column": "image", "label_column": None}
EXTRA = dict(SOURCE, dataset="/data/extra")
BASES, COPIES = 30, 25  # distinct pictures, then near copies of some of them
THUMB = make_thumbnail(Image.new("RGB", (8, 8), (90, 120, 150)), 8)  # a real JPEG: calibration opens it
EDITS = 9  # dino_demo/copies.py's transforms but exact


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def make_vectors(seed: int = 0) -> np.ndarray:
    """(BASES + COPIES, DIM) unit vectors: distinct bases, then copies of a few bases at several distances,
    so groups of 2 to 5 form and some copies straddle the thresholds tested."""
    rng = np.random.default_rng(seed)
    bases = unit(rng.standard_normal((BASES, DIM)))
    of = rng.choice(8, COPIES)  # copies of the first 8 bases only: several per base
    noise = rng.uniform(0.1, 0.6, (COPIES, 1)) * unit(rng.standard_normal((COPIES, DIM)))
    return np.concatenate([bases, unit(bases[of] + noise)])


def rows(start: int, end: int, source: int = 0) -> list[dict]:
    return [{"source_row": r, "width": 32, "height": 32, "label": f"picture {r}", "thumbnail": THUMB,
             "hash": f"{source}-{r}"} for r in range(start, end)]


def write_build(folder: Path, cls: np.ndarray) -> Path:
    rng = np.random.default_rng(1)
    writer = Writer(folder, {"model": MODEL, "source": SOURCE, "skip_faces": False, "thumb_size": 0})
    for at in range(0, len(cls), 20):  # several chunks, as a build writes them
        part = cls[at:at + 20]
        writer.add_chunk(at, at + len(part), part, unit(rng.standard_normal((len(part), 4, DIM))),
                         rows(at, at + len(part)), Counter())
    writer.finalize({})
    return folder


def write_addition(folder: Path, cls: np.ndarray) -> None:
    """What `index_builder add` writes after embedding: a second segment, from a second source."""
    index = load_index(folder)
    info = {"action": "add", "model": MODEL, "patches": index.manifest.get("patches"), "source": EXTRA,
            "base_generation": index.generation}
    writer = Writer(folder, info, source_number=1)
    patches = unit(np.random.default_rng(2).standard_normal((len(cls), 4, DIM)))
    writer.add_chunk(0, len(cls), cls, patches, rows(0, len(cls), source=1), Counter())
    writer.finalize_addition(index, {"action": "add", "time": now(), "source": 1, "images": len(cls), "skipped": {}},
                             [SOURCE, EXTRA])


def brute_force_groups(ids: np.ndarray, cls: np.ndarray, threshold: float) -> tuple[list[list[int]], dict]:
    """Connected components of the all-pairs graph (cosine >= threshold), by repeated squaring of
    reachability, and every pair's cosine: the answer the index search must give."""
    sims = cls @ cls.T  # (n, n)
    near = np.abs(sims - threshold) < 1e-4
    np.fill_diagonal(near, False)
    assert not near.any(), "a pair lies on the threshold: float rounding could decide it; change the data"
    linked = sims >= threshold
    reach = linked | np.eye(len(ids), dtype=bool)
    while True:
        wider = (reach.astype(np.int32) @ reach.astype(np.int32)) > 0
        if (wider == reach).all():
            break
        reach = wider
    components = {tuple(ids[np.flatnonzero(row)].tolist()) for row in reach}
    groups = sorted(list(c) for c in components if len(c) > 1)
    pairs = {(int(ids[i]), int(ids[j])): float(sims[i, j]) for i, j in zip(*np.nonzero(np.triu(linked, 1)))}
    return groups, pairs


def assert_same_as_brute_force(found: list[DuplicateGroup], ids: np.ndarray, cls: np.ndarray, threshold: float):
    groups, pairs = brute_force_groups(ids, cls, threshold)
    assert sorted(g.ids for g in found) == groups
    found_pairs = {(a, b): s for g in found for a, b, s in g.pairs}
    assert found_pairs.keys() == pairs.keys()
    np.testing.assert_allclose([found_pairs[p] for p in pairs], list(pairs.values()), atol=1e-5)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return make_vectors()


@pytest.fixture
def folder(tmp_path, vectors) -> Path:
    return write_build(tmp_path / "idx", vectors)


@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95])
def test_groups_are_the_connected_components_of_all_pairs_above_the_threshold(folder, vectors, threshold):
    found = find_duplicate_groups(load_index(folder), threshold, neighbours=len(vectors))
    assert len(found) >= 2, "the data should make several groups at each threshold tested"
    assert_same_as_brute_force(found, np.arange(len(vectors)), vectors, threshold)


def test_groups_come_largest_first_then_most_alike_with_members_and_pairs_in_order(folder):
    found = find_duplicate_groups(load_index(folder), 0.8)
    keys = [(-len(g.ids), -g.best) for g in found]
    assert keys == sorted(keys)
    for g in found:
        assert g.ids == sorted(g.ids) and all(a < b for a, b, _ in g.pairs)
        assert [s for _, _, s in g.pairs] == sorted((s for _, _, s in g.pairs), reverse=True)
        assert g.best >= g.weakest >= 0.8
        assert {i for a, b, _ in g.pairs for i in (a, b)} == set(g.ids)


def test_a_group_bigger_than_the_neighbours_is_joined_through_chains(tmp_path):
    # Points on one arc at growing gaps: each one's nearest neighbour is the one before it, so one
    # neighbour each still links all five, though the two ends are far below the threshold.
    angles = np.array([0.0, 0.1, 0.25, 0.45, 0.7])
    arc = np.zeros((5, DIM), np.float32)
    arc[:, 0], arc[:, 1] = np.cos(angles), np.sin(angles)
    others = unit(np.random.default_rng(5).standard_normal((10, DIM)))
    others[:, :2] = 0  # far from the arc: orthogonal to its plane
    cls = np.concatenate([arc, unit(others)])
    found = find_duplicate_groups(load_index(write_build(tmp_path / "idx", cls)), 0.96, neighbours=1)
    assert [g.ids for g in found] == [[0, 1, 2, 3, 4]]
    assert float(arc[0] @ arc[4]) < 0.8  # the chain's ends are not near duplicates of each other
    assert found[0].weakest == pytest.approx(np.cos(0.25), abs=1e-5)


def test_removed_images_never_appear_and_the_rest_match_brute_force(folder, vectors):
    everything = find_duplicate_groups(load_index(folder), 0.8)
    gone = [everything[0].ids[0], everything[1].ids[-1], everything[-1].ids[0]]
    remove_images(folder, gone, "test")
    index = load_index(folder)
    found = find_duplicate_groups(index, 0.8, neighbours=len(vectors))
    assert not {i for g in found for i in g.ids} & set(gone)
    live = index.live_ids()
    assert_same_as_brute_force(found, live, vectors[live], 0.8)


def test_copies_added_later_group_with_their_originals_across_segments(folder, vectors):
    rng = np.random.default_rng(9)  # new copies of the first 8 pictures, added as a second source
    added = unit(vectors[np.arange(12) % 8] + rng.uniform(0.1, 0.5, (12, 1)) * unit(rng.standard_normal((12, DIM))))
    write_addition(folder, added)
    index = load_index(folder)
    assert len(index.segments) == 2
    found = find_duplicate_groups(index, 0.85, neighbours=index.count)
    assert_same_as_brute_force(found, index.live_ids(), index.vectors(), 0.85)
    first = len(vectors)
    assert any(i < first <= j for g in found for i, j, _ in g.pairs)  # pairs that span the two segments


def test_a_compressed_index_finds_every_planted_copy(tmp_path):
    # Over COMPRESSED_MIN images the global index is an HNSW graph over 8-bit codes: approximate
    # scores, so check the planted pairs are found and nothing far below the threshold is.
    rng = np.random.default_rng(3)
    bases = unit(rng.standard_normal((1000, DIM)))
    cls = np.concatenate([bases, unit(bases[:100] + 0.2 * unit(rng.standard_normal((100, DIM))))])
    writer = Writer(tmp_path / "idx", {"model": MODEL, "source": SOURCE, "skip_faces": False, "thumb_size": 0,
                                       "index_type": "compressed"})
    writer.add_chunk(0, len(cls), cls, unit(rng.standard_normal((len(cls), 4, DIM))), rows(0, len(cls)), Counter())
    writer.finalize({}, "compressed")
    index = load_index(tmp_path / "idx")
    assert index.manifest["global_factory"] != "Flat"
    found = {(a, b) for g in find_duplicate_groups(index, 0.95) for a, b, _ in g.pairs}
    assert {(i, 1000 + i) for i in range(100)} <= found
    assert all(cls[a] @ cls[b] >= 0.93 for a, b in found)


def test_progress_is_reported_per_batch_and_ends_at_the_total(folder, vectors):
    calls = []
    find_duplicate_groups(load_index(folder), 0.9, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(vectors), len(vectors))


@pytest.mark.parametrize("threshold, neighbours", [(1.5, 20), (-2.0, 20), (0.9, 0)])
def test_settings_that_cannot_work_are_refused_with_a_hint(folder, threshold, neighbours):
    with pytest.raises(UserError, match="--threshold|--neighbours"):
        find_duplicate_groups(load_index(folder), threshold, neighbours)


# --- the command line ---------------------------------------------------------------------------

def test_command_prints_each_group_and_totals_and_writes_json(folder, vectors, tmp_path, capsys):
    out = tmp_path / "groups.json"
    assert main(["duplicates", "--index", str(folder), "--threshold", "0.9", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = find_duplicate_groups(load_index(folder), 0.9)
    written = json.loads(out.read_text())
    assert [g["ids"] for g in written["groups"]] == [g.ids for g in expected]
    first = written["groups"][0]
    assert first["labels"] == [f"picture {i}" for i in first["ids"]] and first["source_rows"] == first["ids"]
    assert first["best"] == pytest.approx(expected[0].best, abs=1e-5)
    assert written["threshold"] == 0.9 and written["images_searched"] == len(vectors)
    assert written["threshold_from"] == "given" and written["calibration"] is None and "calibrated" not in printed
    images = sum(len(g.ids) for g in expected)
    assert printed.strip().splitlines()[-1].startswith(f"{len(expected)} groups, {images} images")
    assert f"group 1: {len(expected[0].ids)} images, similarity {expected[0].weakest:.3f}-{expected[0].best:.3f}" in printed
    assert f"  id {first['ids'][0]:<8} row {first['ids'][0]:<12} picture {first['ids'][0]}" in printed


def test_command_shows_the_source_of_images_added_from_another_dataset(folder, vectors, capsys):
    write_addition(folder, unit(vectors[:1] + 0.05))  # a near copy of image 0, as row 0 of a second source
    assert main(["duplicates", "--index", str(folder), "--threshold", "0.95"]) == 0
    assert f"id {len(vectors):<8} source 1 row 0" in capsys.readouterr().out


def test_command_with_nothing_alike_says_zero_groups(folder, capsys):
    assert main(["duplicates", "--index", str(folder), "--threshold", "1.0"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"0 groups, 0 images (cosine >= 1 among {BASES + COPIES} images)")


@pytest.mark.parametrize("argv, words", [
    (["--threshold", "2"], "between -1 and 1"),
    (["--neighbours", "0"], "at least 1"),
])
def test_command_refuses_bad_settings_in_one_line(folder, capsys, argv, words):
    assert main(["duplicates", "--index", str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1


def test_command_on_a_missing_folder_says_how_to_build_one(tmp_path, capsys):
    assert main(["duplicates", "--index", str(tmp_path / "nothing")]) == 2
    assert "Build one with" in capsys.readouterr().err


@pytest.mark.parametrize("closest, threshold", [
    (0.8731, 0.874), (0.873, 0.874), (0.8739999, 0.874), (0.2, THRESHOLD_FLOOR), (0.9995, 1.0), (1.0, 1.0)])
def test_a_calibrated_threshold_is_the_next_step_above_the_closest_copy_within_the_floor_and_one(closest, threshold):
    assert threshold_above(closest) == threshold


# --- real images through the tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def image_index(tmp_path_factory, embedder) -> Path:
    """A real index of 10 generated pictures plus rescaled, re-encoded and cropped copies of 4 of them."""
    from conftest import write_imagefolder
    from dino_demo.copies import make_copies
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    root = tmp_path_factory.mktemp("duplicates")
    folder = write_imagefolder(root / "images", 10)
    lines = []
    for i in range(4):
        for copy in make_copies(Image.open(folder / f"img{i:03d}.jpg"), seed=100 + i, names=["scale", "jpeg", "crop"]):
            name = f"copy{i:03d}-{copy.transform}.png"  # PNG: the copy's own edit, nothing more
            copy.image.save(folder / name)
            lines.append(f"{name},copy of picture {i} ({copy.transform})")
    with open(folder / "metadata.csv", "a") as f:
        f.write("\n".join(lines) + "\n")
    build_index(open_source(str(folder)), embedder, str(root / "idx"), BuildOptions(workers=0, skip_faces=False))
    return root / "idx"


# The tiny model has random weights: every pair of its CLS vectors is alike (cosine ~0.97-0.99 between
# unrelated pictures), so at 0.9 everything is one group, and no threshold of it stands for DINO's.
# This checks the real path (images -> features -> index -> groups) against brute force only.
@pytest.mark.parametrize("threshold", [0.9, 0.997])
def test_groups_of_real_features_match_brute_force(image_index, threshold):
    index = load_index(image_index)
    found = find_duplicate_groups(index, threshold, neighbours=index.count)
    assert_same_as_brute_force(found, index.live_ids(), index.vectors(), threshold)


# --- calibrating the threshold on the index (tiny model, real copies of its thumbnails) -----------

def recording(embedder):
    """The embed and make_copies the calibration takes, keeping what they were given and returned."""
    seen = {"pictures": [], "cls": []}
    make = copy_maker()

    def embed(images):
        cls = embedder.embed(images).cls
        seen["cls"].append(cls)
        return cls

    def make_copies(picture, seed):
        seen["pictures"].append(np.asarray(picture))
        return make(picture, seed)

    return embed, make_copies, seen


def test_calibration_sits_just_above_the_closest_copy_to_another_image_by_brute_force(image_index, embedder):
    index = load_index(image_index)
    embed, make_copies, seen = recording(embedder)
    cal = calibrate_threshold(index, embed, make_copies, sample=6, seed=1)
    sampled = np.unique(cal.scores.originals)
    assert cal.images == len(sampled) == 6 and (cal.scores.originals == np.repeat(sampled, EDITS)).all()
    for picture, image_id in zip(seen["pictures"], sampled):  # each copied from its original's thumbnail
        assert (picture == np.asarray(load_thumbnail(index, int(image_id)))).all()
    live = index.live_ids()
    sims = np.concatenate(seen["cls"]) @ index.vectors(live).T  # (copies, images)
    own = np.searchsorted(live, cal.scores.originals)
    rows = np.arange(len(sims))
    to_original = sims[rows, own]
    sims[rows, own] = -np.inf
    # An image at least as like the original as its typical copy is a copy already indexed, not another picture.
    likeness = index.vectors(live) @ index.vectors(live).T  # (images, images)
    typical = {o: np.median(to_original[cal.scores.originals == o]) for o in sampled}
    for c, o in enumerate(cal.scores.originals):
        sims[c, likeness[np.searchsorted(live, o)] >= typical[o]] = -np.inf
    to_other = sims.max(axis=1)
    np.testing.assert_allclose(cal.scores.to_original, to_original, atol=1e-5)
    np.testing.assert_allclose(cal.scores.to_other, to_other, atol=1e-5)
    assert (cal.scores.nearest_other == live[sims.argmax(axis=1)]).all()
    assert cal.closest_other == pytest.approx(to_other.max(), abs=1e-5)
    assert to_other.max() < cal.threshold <= max(to_other.max() + 0.001, THRESHOLD_FLOOR) or cal.threshold == 1.0
    assert not (np.abs(to_original - cal.threshold) < 1e-5).any(), "a copy lies on the threshold; change the seed"
    assert cal.recall == pytest.approx((to_original >= cal.threshold).mean())
    transforms = np.array(cal.scores.transforms)
    for name, figures in cal.by_transform().items():
        mine = to_original[transforms == name]
        assert figures["copies"] == 6 and figures["median"] == pytest.approx(np.median(mine), abs=1e-5)
        assert figures["recall"] == pytest.approx((mine >= cal.threshold).mean())


def test_calibration_with_the_same_seed_picks_the_same_images_and_copies(image_index, embedder):
    index = load_index(image_index)
    embed = lambda images: embedder.embed(images).cls  # noqa: E731
    first, again, other = (calibrate_threshold(index, embed, copy_maker(), sample=4, seed=seed) for seed in (3, 3, 4))
    assert first.threshold == again.threshold and first.recall == again.recall
    assert (first.scores.originals == again.scores.originals).all()
    np.testing.assert_array_equal(first.scores.to_original, again.scores.to_original)
    assert not (first.scores.originals == other.scores.originals).all()


def test_command_calibrates_the_threshold_by_default_and_says_how(image_index, tiny_vit, embedder, tmp_path, capsys):
    out = tmp_path / "groups.json"
    argv = ["duplicates", "--index", str(image_index), "--model", str(tiny_vit), "--device", "cpu", "--sample", "5"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    index = load_index(image_index)
    cal = calibrate_threshold(index, lambda images: embedder.embed(images).cls, copy_maker(), sample=5, seed=0)
    assert printed[0].startswith(f"threshold {cal.threshold:.3f}, calibrated on 5 images x {EDITS} copy kinds of "
                                 f"this index (recall {cal.recall:.2f} of the copies")
    assert any(line.split()[:1] == ["crop"] for line in printed[1:EDITS + 3])  # each edit's figures
    written = json.loads(out.read_text())
    assert written["threshold"] == cal.threshold and written["threshold_from"] == "calibrated"
    assert written["calibration"]["recall"] == pytest.approx(cal.recall) and written["calibration"]["images"] == 5
    expected = find_duplicate_groups(index, cal.threshold)
    assert [g["ids"] for g in written["groups"]] == [g.ids for g in expected]
    assert printed[-1].endswith(f"(cosine >= {cal.threshold:g} among {index.count} images)")


def test_command_without_thumbnails_asks_for_a_threshold(tmp_path, embedder, tiny_vit, capsys):
    from conftest import write_imagefolder
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    folder = write_imagefolder(tmp_path / "images", 3)
    build_index(open_source(str(folder)), embedder, str(tmp_path / "idx"),
                BuildOptions(workers=0, skip_faces=False, thumb_size=0))
    capsys.readouterr()  # the build's own progress
    assert main(["duplicates", "--index", str(tmp_path / "idx"), "--model", str(tiny_vit), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "no thumbnails" in err and "--threshold" in err
    assert main(["duplicates", "--index", str(tmp_path / "idx"), "--threshold", "0.99"]) == 0  # a number needs none


def test_command_whose_model_cannot_be_loaded_suggests_a_local_copy_or_a_threshold(folder, capsys):
    # The synthetic index names facebook/dino-vits16, and the tests never reach the Hub.
    assert main(["duplicates", "--index", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "--model" in err and "--threshold" in err


def test_a_near_duplicate_already_in_the_index_does_not_push_the_threshold_up(tmp_path):
    """Image 1 is a near copy of image 0 (cosine 0.99): it is what the command should find, so a
    calibration copy of image 0 landing next to it must not count it as 'another picture'."""
    rng = np.random.default_rng(4)
    bases = unit(rng.standard_normal((12, DIM)))
    bases[1] = unit(bases[0] + 0.14 * unit(rng.standard_normal(DIM)))
    folder = write_build(tmp_path / "idx", bases)
    index = load_index(folder)
    assert index.vector(1) @ index.vector(0) > 0.98

    from dino_demo.duplicates import score_copies

    # two copies of image 0, each about 0.95-like it
    cls = np.stack([unit(bases[0] + 0.3 * unit(np.random.default_rng(i).standard_normal(DIM))) for i in range(2)])
    scores = score_copies(index, np.array([0, 0]), ["scale", "jpeg"], cls)
    assert (scores.nearest_other != 1).all() and (scores.nearest_other != 0).all()
    assert scores.to_other.max() < (cls @ index.vector(1)).max()  # image 1 was nearer, and was passed over
