"""The builder's commands on a finished index, with real images through the tiny model: add, remove,
compact, a finished build rerun, --rebuild, and where an index came from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, write_imagefolder

from dino_demo.engine import Engine
from dino_demo.faces import NoFaceGate
from dino_demo.index import MANIFEST, IndexFolderError, NoSuchImage, load_index
from dino_demo.search import SearchError, search_image
from index_builder.__main__ import main
from index_builder.build import BuildOptions, build_index
from index_builder.source import open_source


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def build_args(images: Path, model: Path, out: Path) -> list:
    return ["--dataset", images, "--model", model, "--out", out, "--workers", 0, "--no-skip-faces", "--device", "cpu",
            "--thumb-size", 32, "--chunk-size", 3]


def add_args(index: Path, images: Path) -> list:
    return ["add", "--index", index, "--dataset", images, "--workers", 0, "--device", "cpu", "--chunk-size", 3]


@pytest.fixture
def first(tmp_path, tiny_vit) -> Path:
    """An index of 8 generated images."""
    out = tmp_path / "idx"
    assert cli(*build_args(write_imagefolder(tmp_path / "first", 8), tiny_vit, out)) == 0
    return out


def more_images(folder: Path, seeds, copies=()) -> Path:
    """New pictures (by seed), and exact copies of first-collection files re-saved losslessly elsewhere."""
    folder.mkdir(parents=True)
    for seed in seeds:
        make_image(seed, (80, 60)).save(folder / f"new{seed}.png")
    for path in copies:
        shutil.copy(path, folder / f"copy-{path.name}")  # same file, same pixels
    return folder


def test_an_index_records_where_it_came_from(first, tmp_path):
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["sources"] == [{"dataset": str((tmp_path / "first").resolve()), "split": "train", "revision": None,
                                    "image_column": "image", "label_column": "label"}]
    assert manifest["history"][0]["action"] == "build" and manifest["history"][0]["images"] == 8


def test_a_resumed_build_of_another_dataset_is_refused(tmp_path, embedder):
    one, two = write_imagefolder(tmp_path / "one", 6), write_imagefolder(tmp_path / "two", 6)
    out = tmp_path / "idx"

    def stop(decoded):
        raise KeyboardInterrupt

    options = BuildOptions(workers=0, skip_faces=False, batch_size=2, chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        build_index(open_source(str(one)), embedder, str(out), options, progress=stop)
    with pytest.raises(IndexFolderError, match=r"unfinished build with other settings \(source"):
        build_index(open_source(str(two)), embedder, str(out), options)
    assert build_index(open_source(str(one)), embedder, str(out), options).indexed == 6  # the same one resumes


def test_adding_embeds_only_new_pictures_with_new_ids_and_leaves_the_old_ones_untouched(first, tmp_path, tiny_vit, embedder, capsys):
    before = load_index(first)
    old_vectors, old_rows = before.vectors(), [before.row(i) for i in range(8)]
    segment = {p.name: p.read_bytes() for p in (first / "seg-000000").iterdir()}
    extra = more_images(tmp_path / "extra", [100, 101, 102], copies=sorted((tmp_path / "first").glob("*.jpg"))[:2])
    assert cli(*add_args(first, extra)) == 0
    err = capsys.readouterr().err
    assert "added 3 images" in err and "2 duplicate" in err and "now holds 11 images in 2 segments" in err
    after = load_index(first, embedder.describe())
    assert after.count == 11 and after.live_ids().tolist() == list(range(11))
    np.testing.assert_array_equal(after.vectors(range(8)), old_vectors)
    assert [after.row(i) for i in range(8)] == old_rows  # ids, metadata and thumbnails
    assert {p.name: p.read_bytes() for p in (first / "seg-000000").iterdir()} == segment
    for image_id, seed in zip((8, 9, 10), (100, 101, 102)):  # each new picture finds itself under its new id
        row = after.row(image_id)
        assert row["source"] == 1 and row["thumbnail"]
        assert search_image(after, embedder.embed([make_image(seed, (80, 60))]), 1)[0].id == image_id
    entry = after.manifest["history"][-1]
    assert entry["action"] == "add" and entry["images"] == 3 and entry["skipped"] == {"duplicate": 2}
    assert after.manifest["sources"][1]["dataset"] == str(extra.resolve())


def test_adding_the_same_dataset_again_adds_nothing(first, tmp_path, capsys):
    assert cli(*add_args(first, tmp_path / "first")) == 0
    assert "added 0 images" in capsys.readouterr().err
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["count"] == 8 and len(manifest["sources"]) == 1 and len(manifest["segments"]) == 1
    assert manifest["history"][-1]["skipped"] == {"duplicate": 8}


def test_adding_with_another_model_is_refused(first, tmp_path, tiny_dinov2, capsys):
    extra = more_images(tmp_path / "extra", [100])
    assert cli(*add_args(first, extra), "--model", tiny_dinov2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "was built with" in err and len(err.splitlines()) == 1


def test_removed_images_leave_every_search_and_cannot_be_added_back(first, tmp_path, embedder, capsys):
    engine = Engine(embedder, load_index(first, embedder.describe()), NoFaceGate(), 10**8, 10**8)
    query = make_image(3, (96, 72))
    assert engine.search_image(query, 8).items[0].id == 3
    assert cli("remove", "--index", first, "--ids", "3") == 0
    assert cli("remove", "--index", first, "--where", "label=picture 5") == 0
    assert "removed 1 image from" in capsys.readouterr().err
    engine = Engine(embedder, load_index(first, embedder.describe()), NoFaceGate(), 10**8, 10**8)
    for results in (engine.search_image(query, 8), engine.search_region(query, (0, 0, 40, 40), 8),
                    engine.search_similar(0, 8)):
        assert {3, 5}.isdisjoint(item.id for item in results.items) and len(results.items) == 6
    with pytest.raises(SearchError, match="no image 3"):
        engine.search_similar(3, 8)
    with pytest.raises(NoSuchImage):
        engine.result_image(5)
    again = more_images(tmp_path / "again", [], copies=[tmp_path / "first" / "img003.jpg"])
    assert cli(*add_args(first, again)) == 0
    assert "1 removed earlier" in capsys.readouterr().err
    assert cli("remove", "--index", first, "--ids", "99") == 2
    assert "has no image 99" in capsys.readouterr().err


def test_compact_drops_removed_images_and_keeps_ids(first, tmp_path, embedder, capsys):
    extra = more_images(tmp_path / "extra", [100, 101])
    assert cli(*add_args(first, extra)) == 0
    assert cli("remove", "--index", first, "--source-rows", "2,4") == 0
    before = load_index(first)
    assert cli("compact", "--index", first) == 0
    assert "ids are unchanged" in capsys.readouterr().err
    after = load_index(first, embedder.describe())
    assert after.live_ids().tolist() == before.live_ids().tolist() == [0, 1, 3, 5, 6, 7, 8, 9]
    assert len(after.segments) == 1 and not {2, 4} & set(after.segments[0].ids.tolist())
    np.testing.assert_allclose(after.vectors(), before.vectors(), atol=1e-6)
    assert [after.row(i)["thumbnail"] for i in (0, 9)] == [before.row(i)["thumbnail"] for i in (0, 9)]


def test_rerunning_a_finished_build_does_nothing_and_rebuild_keeps_removed_images_out(first, tmp_path, tiny_vit, capsys):
    assert cli("remove", "--index", first, "--ids", "1") == 0
    manifest = (first / MANIFEST).read_text()
    capsys.readouterr()
    assert cli(*build_args(tmp_path / "first", tiny_vit, first)) == 0
    assert "already a complete index" in capsys.readouterr().err and (first / MANIFEST).read_text() == manifest
    assert cli(*build_args(tmp_path / "first", tiny_vit, first), "--rebuild") == 0
    assert "1 removed earlier" in capsys.readouterr().err
    rebuilt = load_index(first)
    assert rebuilt.count == 7 and rebuilt.ids.tolist() == list(range(7)) and len(rebuilt.segments) == 1
    assert 1 not in rebuilt.meta.column("source_row").to_pylist()


def test_building_another_dataset_into_a_finished_index_is_refused(first, tmp_path, tiny_vit, capsys):
    other = write_imagefolder(tmp_path / "other", 3)
    assert cli(*build_args(other, tiny_vit, first)) == 2
    err = capsys.readouterr().err
    assert "already holds an index of" in err and "index_builder add --index" in err and "--rebuild" in err
