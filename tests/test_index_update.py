"""A living index on synthetic vectors: after adds and removes (and a compaction), every index type and
patch layout answers as a fresh build of the same images does (exact indexes) or reaches its recall
(compressed); removed images never come back; ids are never reused and survive a compaction."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dino_demo.index import Index, NoSuchImage, load_index
from dino_demo.index_update import SelectionError, compact, remove_images, select_ids
from dino_demo.index_writer import FolderBusy, Writer, hold_lock, now
from dino_demo.model import Features
from dino_demo.patch_select import PatchLayout
from dino_demo.search import search_image, search_region

DIM, GRID = 32, (2, 2)
MODEL = {"id": "facebook/dino-vits16", "revision": None, "type": "vit", "input_size": 32,
         "patch_size": 16, "dim": DIM, "grid": list(GRID)}
FIRST, ADDED = 1100, 240  # compressed indexes need 1,000 vectors to train on
SOURCE = {"dataset": "/data/first", "split": "train", "revision": None, "image_column": "image", "label_column": None}
EXTRA = dict(SOURCE, dataset="/data/extra")


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def images():
    """Clustered vectors of FIRST + ADDED images: (cls (n, d), patches (n, 4, d)), as real features are."""
    rng = np.random.default_rng(7)
    n = FIRST + ADDED
    centres = unit(rng.standard_normal((60, DIM)))
    cls = unit(centres[rng.integers(0, 60, n)] + 0.35 * rng.standard_normal((n, DIM)))
    patches = unit(cls[:, None, :] + 0.6 * rng.standard_normal((n, 4, DIM)))
    return cls, patches


def rows(start: int, end: int, source: int = 0) -> list[dict]:
    return [{"source_row": r, "width": 32, "height": 32, "label": f"label {r % 7}", "thumbnail": f"t{r}".encode(),
             "hash": f"{source}-{r}"} for r in range(start, end)]


def write_build(folder: Path, cls, patches, layout: str, index_type: str, meta: list[dict]) -> None:
    writer = Writer(folder, {"model": MODEL, "source": SOURCE, "skip_faces": False, "thumb_size": 0,
                             "patches": PatchLayout.parse(layout).describe(), "index_type": index_type})
    for at in range(0, len(cls), 500):
        writer.add_chunk(at, at + len(cls[at:at + 500]), cls[at:at + 500], patches[at:at + 500], meta[at:at + 500], Counter())
    writer.finalize({}, index_type)


def write_addition(folder: Path, cls, patches, meta: list[dict]) -> dict:
    """What `index_builder add` does after embedding: a new segment in the folder's trained indexes."""
    index = load_index(folder)
    m = index.manifest
    info = {"action": "add", "model": m["model"], "patches": m["patches"], "source": EXTRA,
            "base_generation": index.generation}
    writer = Writer(folder, info, source_number=1)
    writer.add_chunk(0, len(cls), cls, patches, meta, Counter())
    entry = {"action": "add", "time": now(), "source": 1, "images": len(cls), "skipped": {}}
    return writer.finalize_addition(index, entry, [SOURCE, EXTRA])


def queries(index: Index, cls, patches, n: int = 40) -> list[Features]:
    rng = np.random.default_rng(3)
    picks = rng.choice(len(cls), n, replace=False)
    return [Features(cls[i:i + 1] * 0.9 + 0.1 * cls[(i + 1) % len(cls)], patches[i:i + 1], GRID, [(32, 32)])
            for i in picks]


def answers(index: Index, features: list[Features], kind: str) -> list[list[tuple[int, float]]]:
    """Each query's top 10 as (source key, score): comparable between indexes whatever their ids."""
    keys = {int(i): (r["source"], r["source_row"]) for i, r in
            zip(index.meta.column("id").to_pylist(), index.meta.to_pylist())}
    search = (lambda f: search_image(index, f, 10)) if kind == "image" else \
        (lambda f: search_region(index, f, (0, 0, 32, 16), 10))
    return [[(keys[h.id], round(h.score, 4)) for h in search(f)] for f in features]


LAYOUTS = ["all", "pooled", "salient:2"]


@pytest.fixture(scope="module", params=[(t, l) for t in ("flat", "compressed") for l in LAYOUTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def living(request, images, tmp_path_factory):
    """An index built from FIRST images, grown by ADDED more, with 60 of either kind removed; and a fresh
    build of exactly the images that remain, for comparison."""
    index_type, layout = request.param
    cls, patches = images
    folder = tmp_path_factory.mktemp("living") / "idx"
    write_build(folder, cls[:FIRST], patches[:FIRST], layout, index_type, rows(0, FIRST))
    write_addition(folder, cls[FIRST:], patches[FIRST:], rows(0, ADDED, source=1))
    removed = sorted(np.random.default_rng(5).choice(FIRST + ADDED, 60, replace=False).tolist())
    remove_images(folder, removed, "test")
    keep = np.setdiff1d(np.arange(FIRST + ADDED), removed)
    fresh = tmp_path_factory.mktemp("fresh") / "idx"
    meta = rows(0, FIRST) + rows(0, ADDED, source=1)
    for row, source in zip(meta, [0] * FIRST + [1] * ADDED):
        row["source"] = source
    write_build(fresh, cls[keep], patches[keep], layout, index_type, [meta[i] for i in keep])
    exact = fresh
    if index_type != "flat":  # the exact answer, to measure recall against
        exact = tmp_path_factory.mktemp("exact") / "idx"
        write_build(exact, cls[keep], patches[keep], layout, "flat", [meta[i] for i in keep])
    return index_type, folder, fresh, exact, removed


def test_rows_of_many_images_read_each_row_group_once_and_equal_row_by_row(living, monkeypatch):
    _, folder, _, _, removed = living
    index = load_index(folder)
    live = index.live_ids()
    old, new = live[live < FIRST][:3].tolist(), live[live >= FIRST][:2].tolist()  # early rows: one group each
    ids = [new[1], old[1], new[0], old[2], old[0], new[1]]  # both segments, out of order, one twice
    expected = [index.row(i) for i in ids]
    reads = []
    for segment in index.segments:
        read = segment.thumbnails.read_row_group
        monkeypatch.setattr(segment.thumbnails, "read_row_group",
                            lambda group, columns, read=read, seg=segment: reads.append((id(seg), group)) or read(group, columns))
    assert index.rows(ids) == expected
    assert len(reads) == len(set(reads)) == 2  # one group in each segment, read once
    with pytest.raises(NoSuchImage):
        index.rows([0, int(removed[0])])


def test_ids_are_stable_new_ones_follow_and_removed_ones_are_gone(living, images):
    _, folder, _, _, removed = living
    index = load_index(folder)
    assert index.count == FIRST + ADDED - 60 and len(index.segments) == 2
    assert index.manifest["next_id"] == FIRST + ADDED
    assert index.row(FIRST)["source"] == 1 and index.row(FIRST)["source_row"] == 0  # the first added image
    np.testing.assert_allclose(index.vector(FIRST), images[0][FIRST], atol=0.02)
    for image_id in removed[:5]:
        assert not index.has(image_id)
        with pytest.raises(NoSuchImage):
            index.row(image_id)  # no thumbnail of a removed image can be read
        with pytest.raises(NoSuchImage):
            index.vector(image_id)


@pytest.mark.parametrize("kind", ["image", "region"])
def test_after_adds_and_removes_results_match_a_fresh_build_of_the_same_images(living, images, kind):
    index_type, folder, fresh, exact, removed = living
    grown, rebuilt = load_index(folder), load_index(fresh)
    asked = queries(grown, *images)
    got, want = answers(grown, asked, kind), answers(rebuilt, asked, kind)
    removed_keys = {(0, r) if r < FIRST else (1, r - FIRST) for r in removed}
    assert not {key for hits in got for key, _ in hits} & removed_keys
    if index_type == "flat":
        assert got == want  # exact: the same images with the same scores, in the same order
    else:  # compressed: the same recall of the exact top 10
        truth = [{k for k, _ in hits} for hits in answers(load_index(exact), asked, kind)]
        recall = lambda answer: np.mean([len({k for k, _ in a} & t) / 10 for a, t in zip(answer, truth)])
        assert recall(got) >= recall(want) - 0.03, (recall(got), recall(want))


def test_compact_keeps_ids_and_answers_and_drops_removed_images_from_the_folder(living, images, tmp_path):
    import shutil

    index_type, folder, _, _, removed = living
    copy = Path(shutil.copytree(folder, tmp_path / "idx"))
    before = load_index(copy)
    asked = queries(before, *images, n=15)
    image_before, region_before = answers(before, asked, "image"), answers(before, asked, "region")
    manifest = compact(copy)
    after = load_index(copy)
    assert len(after.segments) == 1 and after.count == before.count and manifest["stored"] == before.count
    np.testing.assert_array_equal(after.live_ids(), before.live_ids())  # ids survive a compaction
    assert not set(removed) & set(after.segments[0].ids.tolist())  # vectors and thumbnails are gone
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith("seg-")) == [manifest["segments"][0]["dir"]]
    if index_type == "flat":
        assert answers(after, asked, "image") == image_before
        assert answers(after, asked, "region") == region_before
    assert manifest["history"][-1]["action"] == "compact" and manifest["history"][-1]["kept"] == before.count
    # ids are never reused: an addition after a compaction continues after the highest id ever given
    cls, patches = images
    write_addition(copy, cls[:3] * -1, patches[:3], [dict(r, hash=f"again-{i}") for i, r in enumerate(rows(0, 3))])
    assert load_index(copy).live_ids()[-3:].tolist() == [FIRST + ADDED, FIRST + ADDED + 1, FIRST + ADDED + 2]


def test_an_addition_reuses_the_trained_quantisers_and_leaves_existing_files_untouched(images, tmp_path):
    cls, patches = images
    folder = tmp_path / "idx"
    write_build(folder, cls[:FIRST], patches[:FIRST], "all", "compressed", rows(0, FIRST))
    first = load_index(folder).manifest
    files = {p: p.read_bytes() for p in (folder / first["segments"][0]["dir"]).iterdir()}
    trained = {name: (folder / name).read_bytes() for name in first["trained"].values()}
    manifest = write_addition(folder, cls[FIRST:], patches[FIRST:], rows(0, ADDED, source=1))
    assert manifest["trained"] == first["trained"] and manifest["trained_on"] == FIRST  # not retrained
    assert all(path.read_bytes() == data for path, data in files.items())  # the first segment, byte for byte
    assert all((folder / name).read_bytes() == data for name, data in trained.items())
    assert manifest["global_factory"] == first["global_factory"] == "HNSW32,SQ8"
    assert [h["action"] for h in manifest["history"]] == ["add"]  # a Writer-made build records no entry itself


def test_select_by_id_source_row_and_label(images, tmp_path):
    cls, patches = images
    folder = tmp_path / "idx"
    write_build(folder, cls[:50], patches[:50], "all", "flat", rows(0, 50))
    write_addition(folder, cls[50:60], patches[50:60], rows(0, 10, source=1))
    index = load_index(folder)
    assert select_ids(index, source_rows=[3, 4]) == [3, 4]
    assert select_ids(index, source_rows=[3], source=1) == [53]
    assert select_ids(index, where=("label", "label 0")) == [i for i in range(50) if i % 7 == 0] + [50, 57]
    with pytest.raises(SelectionError, match="no indexed row 99"):
        select_ids(index, source_rows=[99])
    with pytest.raises(SelectionError, match="--where can test"):
        select_ids(index, where=("thumbnail", "x"))
    done = remove_images(folder, [3, 53], "test")
    assert done.removed == [3, 53] and done.manifest["count"] == 58
    again = remove_images(folder, [3], "test")
    assert again.removed == [] and again.already == [3]
    with pytest.raises(SelectionError, match="has no image 500"):
        remove_images(folder, [500], "test")
    assert load_index(folder).removed_hashes == {"0-3", "1-3"}  # kept, so these pictures are not added again


def test_removing_every_image_leaves_an_empty_index_that_compact_refuses(images, tmp_path):
    cls, patches = images
    folder = tmp_path / "idx"
    write_build(folder, cls[:5], patches[:5], "all", "flat", rows(0, 5))
    remove_images(folder, range(5), "all of them")
    index = load_index(folder)
    assert index.count == 0 and search_image(index, Features(cls[:1], patches[:1], GRID, [(32, 32)]), 5) == []
    with pytest.raises(Exception, match="Every image"):
        compact(folder)


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(images, tmp_path):
    cls, patches = images
    folder = tmp_path / "idx"
    write_build(folder, cls[:5], patches[:5], "all", "flat", rows(0, 5))
    with hold_lock(folder):
        with pytest.raises(FolderBusy, match="is being changed by process"):
            remove_images(folder, [1], "test")
        with pytest.raises(FolderBusy):
            compact(folder)
    assert remove_images(folder, [1], "test").removed == [1]  # free again once the first is done


def test_a_search_looks_past_removed_images_crowding_the_top(images, tmp_path):
    """The query's 30 nearest images are removed: an exact index still answers with the next 10,
    exactly as brute force over what remains does."""
    cls, patches = images
    folder = tmp_path / "idx"
    write_build(folder, cls[:300], patches[:300], "all", "flat", rows(0, 300))
    query = cls[7:8]
    nearest = np.argsort(-(cls[:300] @ query[0]))
    remove_images(folder, nearest[:30].tolist(), "crowding the top")
    hits = search_image(load_index(folder), Features(query, patches[7:8], GRID, [(32, 32)]), 10)
    assert [h.id for h in hits] == nearest[30:40].tolist()
