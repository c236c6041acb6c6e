import json
import os
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import index_file

from dino_demo.index import GLOBAL, MANIFEST, META, PATCHES, IndexFolderError, load_index
from dino_demo.index_writer import Writer

MODEL = {"id": "facebook/dino-vits16", "revision": None, "type": "vit", "input_size": 64,
         "patch_size": 16, "dim": 8, "grid": [2, 2]}
INFO = {"model": MODEL, "source": {"image_column": "image", "label_column": None}, "skip_faces": True, "thumb_size": 0}


def unit(rng, *shape):
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def meta_rows(rows):
    return [{"source_row": r, "width": 10 + r, "height": 20, "label": f"row {r}", "thumbnail": b"x",
             "hash": f"h{r}"} for r in rows]


def write_index(folder, chunks=((0, 3, [0, 2]), (3, 5, [3, 4]))):
    """Write chunks of (row_start, row_end, kept rows); returns all vectors in id order."""
    rng = np.random.default_rng(0)
    writer = Writer(folder, INFO)
    all_cls, all_patches = [], []
    for start, end, kept in chunks:
        cls, patches = unit(rng, len(kept), 8), unit(rng, len(kept), 4, 8)
        skipped = Counter({"unreadable image": (end - start) - len(kept)})
        writer.add_chunk(start, end, cls, patches, meta_rows(kept), skipped)
        all_cls.append(cls)
        all_patches.append(patches)
    manifest = writer.finalize({"note": "test"})
    return manifest, np.concatenate(all_cls), np.concatenate(all_patches)


def test_round_trip_keeps_vectors_ids_and_metadata(tmp_path):
    manifest, cls, patches = write_index(tmp_path / "idx")
    index = load_index(tmp_path / "idx", MODEL)
    assert index.count == 4 and manifest["count"] == 4
    assert manifest["skipped"] == {"unreadable image": 1}
    np.testing.assert_allclose(index.vectors(), cls)
    # patches are kept as float16 while building: close, not identical
    np.testing.assert_allclose(np.concatenate([index.image_patches(i) for i in range(4)]), patches.reshape(16, 8), atol=1e-3)
    assert [index.row(i)["source_row"] for i in range(4)] == [0, 2, 3, 4]
    assert index.row(2) == {"id": 2, "source_row": 3, "width": 13, "height": 20, "label": "row 3", "thumbnail": b"x",
                            "source": 0, "hash": "h3"}
    assert index.size(1) == (12, 20)
    assert not (tmp_path / "idx" / "_build").exists()


def test_manifest_records_model_source_and_factories(tmp_path):
    write_index(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["model"] == MODEL and manifest["sources"] == [INFO["source"]]
    assert manifest["global_factory"] == "Flat" and manifest["patches_per_image"] == 4
    assert manifest["note"] == "test" and manifest["format_version"] == 2


def test_a_local_folder_of_the_same_model_is_accepted(tmp_path):
    write_index(tmp_path / "idx")
    load_index(tmp_path / "idx", dict(MODEL, id="/models/dino-vits16"))


@pytest.mark.parametrize("change, words", [
    ({"id": "facebook/dinov2-small"}, "dinov2-small"),
    ({"dim": 16}, "dim 8 vs 16"),
    ({"grid": [4, 4]}, "grid"),
    ({"input_size": 224}, "input_size"),
])
def test_an_index_for_another_model_is_refused(tmp_path, change, words):
    write_index(tmp_path / "idx")
    with pytest.raises(IndexFolderError, match=words) as caught:
        load_index(tmp_path / "idx", dict(MODEL, **change))
    assert "--model facebook/dino-vits16" in str(caught.value)


def test_other_format_version_is_refused(tmp_path):
    write_index(tmp_path / "idx")
    path = tmp_path / "idx" / MANIFEST
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=99)))
    with pytest.raises(IndexFolderError, match="format 99"):
        load_index(tmp_path / "idx")


@pytest.mark.parametrize("name", [GLOBAL, PATCHES, META, MANIFEST])
def test_a_missing_file_is_named(tmp_path, name):
    write_index(tmp_path / "idx")
    index_file(tmp_path / "idx", name).unlink()
    with pytest.raises(IndexFolderError, match=name.replace(".", r"\.")):
        load_index(tmp_path / "idx")


@pytest.mark.parametrize("name", [GLOBAL, PATCHES, META, MANIFEST])
def test_a_truncated_file_is_named(tmp_path, name):
    write_index(tmp_path / "idx")
    path = index_file(tmp_path / "idx", name)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IndexFolderError, match=name.replace(".", r"\.")):
        load_index(tmp_path / "idx")


def test_a_missing_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexFolderError, match="python -m index_builder"):
        load_index(tmp_path / "nothing")


def test_an_unfinished_build_is_not_an_index_and_can_be_resumed(tmp_path):
    rng = np.random.default_rng(1)
    writer = Writer(tmp_path / "idx", INFO)
    writer.add_chunk(0, 2, unit(rng, 2, 8), unit(rng, 2, 4, 8), meta_rows([0, 1]), Counter())
    with pytest.raises(IndexFolderError, match="unfinished build"):
        load_index(tmp_path / "idx")
    resumed = Writer(tmp_path / "idx", INFO)  # a new process after a crash
    assert resumed.resume_row() == 2
    resumed.add_chunk(2, 3, unit(rng, 1, 8), unit(rng, 1, 4, 8), meta_rows([2]), Counter())
    assert resumed.finalize({})["count"] == 3


def test_a_half_written_chunk_is_discarded_on_resume(tmp_path):
    writer = Writer(tmp_path / "idx", INFO)
    (writer.work / "chunk-0000000.tmp").mkdir()
    (writer.work / "chunk-0000000.tmp" / "cls.npy").write_bytes(b"partial")
    resumed = Writer(tmp_path / "idx", INFO)
    assert resumed.resume_row() == 0 and resumed.chunks() == []


def test_resuming_with_other_settings_is_refused(tmp_path):
    Writer(tmp_path / "idx", INFO)
    with pytest.raises(IndexFolderError, match="skip_faces"):
        Writer(tmp_path / "idx", dict(INFO, skip_faces=False))


def test_a_chunk_of_only_skipped_rows_is_counted(tmp_path):
    manifest, _, _ = write_index(tmp_path / "idx", chunks=((0, 2, [0, 1]), (2, 5, []), (5, 6, [5])))
    assert manifest["count"] == 3 and manifest["skipped"] == {"unreadable image": 3}
    assert [load_index(tmp_path / "idx").row(i)["source_row"] for i in range(3)] == [0, 1, 5]


def test_an_index_of_nothing_is_refused_with_the_reasons(tmp_path):
    writer = Writer(tmp_path / "idx", INFO)
    writer.add_chunk(0, 2, np.zeros((0, 8)), np.zeros((0, 4, 8)), [], Counter({"face": 2}))
    with pytest.raises(IndexFolderError, match="2 face"):
        writer.finalize({})


# --- compressed indexes (HNSW / IVF-PQ chosen by --index-type or by size) ---------------------------------

CMODEL = dict(MODEL, dim=32)
CINFO = dict(INFO, model=CMODEL)


def clustered(rng, *shape, clusters=40):
    """Unit vectors around `clusters` centres: the structure real features have and IVF relies on."""
    centres = unit(rng, clusters, shape[-1])
    v = centres[rng.integers(0, clusters, shape[:-1])]
    return _unit_rows(v + 0.4 * unit(rng, *shape))


def _unit_rows(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """2,000 images (8,000 patch vectors) built compressed, the build interrupted after 2 of 4 chunks."""
    rng, folder = np.random.default_rng(3), tmp_path_factory.mktemp("ivf") / "idx"
    cls, patches = clustered(rng, 2000, 32), clustered(rng, 2000, 4, 32)
    writer = Writer(folder, CINFO)
    for start in (0, 500):
        writer.add_chunk(start, start + 500, cls[start:start + 500], patches[start:start + 500], meta_rows(range(start, start + 500)), Counter())
    resumed = Writer(folder, CINFO)  # a new process after a crash
    assert resumed.resume_row() == 1000
    for start in (1000, 1500):
        resumed.add_chunk(start, start + 500, cls[start:start + 500], patches[start:start + 500], meta_rows(range(start, start + 500)), Counter())
    resumed.finalize({}, "compressed")
    return load_index(folder, CMODEL), cls, patches


def test_a_resumed_compressed_build_records_its_factory_and_search_parameters(compressed):
    index, cls, _ = compressed
    m = index.manifest
    assert m["global_factory"] == "HNSW32,SQ8" and m["patch_factory"] == "IVF128_HNSW32,PQ2x4,Refine(SQ8)"
    assert m["global_search"] == "efSearch=128"
    assert m["patch_search"] == "nprobe=8,quantizer_efSearch=16,k_factor_rf=1"
    assert faiss.downcast_index(index.segments[0].global_index).hnsw.efSearch == 128  # applied on opening
    assert faiss.extract_index_ivf(index.segments[0].patch_index).nprobe == 8
    assert index.count == 2000 and index.patch_index.ntotal == 8000
    assert [index.row(i)["source_row"] for i in (0, 999, 1000, 1999)] == [0, 999, 1000, 1999]
    # re-ranking reads 8-bit codes back: near the exact vectors
    np.testing.assert_allclose(index.vectors(), cls, atol=0.02)


def test_compressed_search_finds_each_image_first_and_agrees_with_exact_search(compressed):
    index, cls, _ = compressed
    scores, ids = index.global_index.search(cls[:100], 10)
    assert (ids[:, 0] == np.arange(100)).all()
    exact = np.argsort(-(cls[:100] @ cls.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= 0.9, recall


def test_compressed_index_files_are_opened_memory_mapped(compressed, monkeypatch):
    import dino_demo.index_types as index_types

    flags = []
    real = faiss.read_index
    monkeypatch.setattr(index_types.faiss, "read_index", lambda path, f: flags.append(f) or real(path, f))
    load_index(compressed[0].path)
    assert flags == [faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY] * 2


def test_every_chunk_file_and_index_file_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    # A power cut after a rename must not leave an empty file behind it: each is fsynced first.
    from dino_demo import atomic

    synced, real_fsync, real_replace = [], atomic.fsync, os.replace

    def fsync(path):
        synced.append(Path(path).name)
        real_fsync(path)

    def replace(src, dst):
        src = Path(src)
        names = [p.name for p in src.iterdir()] if src.is_dir() else [src.name]
        assert set(names) <= set(synced), f"renamed {src.name} before syncing {set(names) - set(synced)}"
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_index(tmp_path / "idx")
    assert {"info.json", "cls.npy", "patches.npy", "meta.parquet"} <= set(synced)
    assert {GLOBAL, PATCHES, META} <= set(synced)  # in the segment folder, before its rename
    assert any(s.startswith(f".{MANIFEST}.tmp") for s in synced)
