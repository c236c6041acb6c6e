"""The Ray distributor on a local Ray instance (2 CPUs, the tiny model): the same index as a local build,
a killed worker loses or repeats no row, a stopped run resumes, and a stream's shards are read apart."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import ROOT, make_image, write_imagefolder

from dino_demo.index import load_index
from index_builder.build import BuildOptions, build_index
from index_builder.ray_build import RayDistributor
from index_builder.source import SourceError, open_source

IMAGES = 24
OPTIONS = dict(batch_size=4, chunk_size=4, turned_faces=False)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray instance for the module: its workers import this checkout and share the tests' caches."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Pictures with what a build must skip: a duplicate far from its original, a broken file, a face."""
    from matplotlib import cbook
    from PIL import Image

    folder = write_imagefolder(tmp_path_factory.mktemp("ray-images") / "images", IMAGES)
    shutil.copy(folder / "img002.jpg", folder / "img021.jpg")  # the same pixels, in another chunk and shard
    (folder / "img009.jpg").write_bytes(b"not a jpeg")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        Image.open(f).save(folder / "img014.jpg")
    return folder


@pytest.fixture(scope="module")
def local(images, embedder, tmp_path_factory) -> Path:
    """The reference: the same collection built on this machine in one process."""
    out = tmp_path_factory.mktemp("local") / "idx"
    build_index(open_source(str(images)), embedder, str(out), BuildOptions(workers=0, **OPTIONS))
    return out


def ray_build(images: Path, embedder, out: Path, progress=None, **options):
    return build_index(open_source(str(images)), embedder, str(out), BuildOptions(**{**OPTIONS, **options}),
                       progress, distributor=RayDistributor())


def assert_same_index(path: Path, reference: Path) -> None:
    """The same images in the same order, with the same ids, metadata, skip counts and vectors."""
    got, want = load_index(path), load_index(reference)
    assert got.meta.column("id").to_pylist() == want.meta.column("id").to_pylist()
    assert got.meta.equals(want.meta)  # source rows, sizes, labels, thumbnails, hashes
    assert got.manifest["skipped"] == want.manifest["skipped"]
    np.testing.assert_allclose(got.vectors(), want.vectors(), atol=1e-5)
    np.testing.assert_allclose(all_patches(got), all_patches(want), atol=1e-3)


def all_patches(index) -> np.ndarray:
    return np.concatenate([index.image_patches(int(i)) for i in index.live_ids()])


def test_a_ray_build_is_the_same_index_as_a_local_build(images, embedder, local, tmp_path):
    done = []
    report = ray_build(images, embedder, tmp_path / "idx", progress=done.append)
    assert_same_index(tmp_path / "idx", local)
    assert report.skipped == {"unreadable image": 1, "face": 1, "duplicate": 1}
    assert report.indexed == IMAGES - 3
    assert sorted((d.first_row, d.last_row) for d in done) == [(r, r + 3) for r in range(0, IMAGES, 4)]
    assert len({d.writer for d in done}) == 1 and all(d.reader != d.writer for d in done)  # two kinds of worker


def test_a_worker_killed_mid_run_loses_and_repeats_no_row(images, embedder, local, tmp_path):
    done, killed = [], []

    def kill_once(chunk):
        done.append(chunk)
        if not killed:  # the embedding actor, while chunks are still to come: Ray restarts it
            killed.append(chunk.writer)
            os.kill(chunk.writer, signal.SIGKILL)

    ray_build(images, embedder, tmp_path / "idx", progress=kill_once)
    assert len(done) == IMAGES // 4 and any(d.writer != killed[0] for d in done)  # a new actor wrote the rest
    assert_same_index(tmp_path / "idx", local)


class Stop(Exception):
    pass


def test_a_stopped_build_resumes_with_ray_whichever_ran_before(images, embedder, local, tmp_path):
    out = tmp_path / "idx"

    def stop_at_row_8(decoded):
        if decoded.last_row >= 8:
            raise Stop

    with pytest.raises(Stop):  # a local run: rows 0-7 in chunks of its own making
        build_index(open_source(str(images)), embedder, str(out), BuildOptions(workers=0, **OPTIONS), stop_at_row_8)

    def stop_after_two_chunks(chunk, seen=[]):
        seen.append(chunk)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):  # then a Ray run, stopped too: it leaves gaps between its chunks
        ray_build(images, embedder, out, progress=stop_after_two_chunks)
    def finished():
        chunks = sorted(p for p in (out / "_build").glob("rows-*") if p.suffix == "")
        return chunks, sum(int(end) - int(start) for start, end in (p.name.split("-")[1:] for p in chunks))

    chunks, rows_done = finished()
    if rows_done == IMAGES:  # the actors in flight wrote every chunk before the stop took hold (a race):
        shutil.rmtree(chunks[-2])  # take one out, leaving a gap with a finished chunk after it, as a stop does
        chunks, rows_done = finished()
    assert 8 + 2 * 4 <= rows_done < IMAGES
    report = ray_build(images, embedder, out)
    assert report.resumed_from >= 8 and report.rows_this_run == IMAGES - rows_done  # only what was left
    assert_same_index(out, local)


@pytest.mark.parametrize("stop", [10, 7])
def test_each_shard_holds_the_rows_at_its_place_in_the_collection(image_folder, stop):
    source = open_source(str(image_folder))  # 12 rows, cut into shards of about 3 that do not divide them evenly
    shards = source.shards(stop, 3)
    assert [(s.first_row, s.end_row) for s in shards][:2] == [(0, 3), (3, 6) if stop == 10 else (3, 5)]
    read = [(row.index, row.label) for s in shards for row in source.shard_rows(s, s.first_row, s.end_row)]
    assert read == [(row.index, row.label) for row in source.rows(0, stop)]
    middle = shards[1]
    assert [row.index for row in source.shard_rows(middle, middle.first_row + 1, middle.end_row)] == \
        list(range(middle.first_row + 1, middle.end_row))


def write_parquet_parts(folder: Path, sizes: list[int]) -> Path:
    """One parquet file per size: a stream's shards, each with its own number of rows."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    folder.mkdir(parents=True)
    first = 0
    for part, size in enumerate(sizes):
        rows = range(first, first + size)
        images = [{"bytes": _jpeg(make_image(i)), "path": None} for i in rows]
        table = datasets.Dataset.from_dict({"image": images, "label": [f"row {i}" for i in rows]}, features=features)
        table.to_parquet(str(folder / f"part-{part}.parquet"))
        first += size
    return folder


def _jpeg(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def test_a_streamed_collection_is_read_shard_by_shard_with_the_rows_of_a_local_stream(embedder, tmp_path):
    files = str(write_parquet_parts(tmp_path / "parts", [5, 7, 6]) / "*.parquet")
    options = BuildOptions(workers=0, skip_faces=False, batch_size=4, chunk_size=3, limit=15)
    build_index(open_source(files, streaming=True), embedder, str(tmp_path / "local"), options)
    done = []
    build_index(open_source(files, streaming=True), embedder, str(tmp_path / "ray"), options, done.append,
                distributor=RayDistributor())
    assert_same_index(tmp_path / "ray", tmp_path / "local")
    assert load_index(tmp_path / "ray").count == 15
    # chunks never straddle two files: rows 0-4, 5-11 and 12-14 (the limit) are read by separate tasks
    assert sorted((d.first_row, d.last_row) for d in done) == [(0, 2), (3, 4), (5, 7), (8, 10), (11, 11), (12, 14)]


def test_the_command_builds_on_the_cluster_at_the_address_it_is_given(images, tiny_vit, local, tmp_path):
    out = tmp_path / "idx"
    done = subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(images), "--model", str(tiny_vit),
                           "--out", str(out), "--batch-size", "4", "--chunk-size", "4", "--no-turned-faces",
                           "--ray", ray.get_runtime_context().gcs_address],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on a Ray cluster of 2 CPUs and 0 GPUs, a model per machine on its CPUs (batch 4)" in done.stderr
    assert f"indexed {IMAGES - 3} images into {out}" in done.stderr
    assert_same_index(out, local)


def test_a_worker_that_cannot_open_the_dataset_or_the_model_stops_the_run_with_the_builders_own_message(
        embedder, tiny_vit, tmp_path):
    from dino_demo.errors import UserError
    from dino_demo.model import Embedder

    model = shutil.copytree(tiny_vit, tmp_path / "model")
    moved = Embedder(str(model), device="cpu")
    shutil.rmtree(model)  # gone before the workers load it, as on a machine that lacks it
    with pytest.raises(UserError) as raised:
        build_index(open_source(str(write_imagefolder(tmp_path / "images", 4))), moved, str(tmp_path / "one"),
                    BuildOptions(skip_faces=False), distributor=RayDistributor())
    assert not isinstance(raised.value, ray.exceptions.RayError)  # the Embedder's own error, not Ray's wrapping
    assert str(raised.value).startswith(f"Cannot reach the Hugging Face Hub to download model '{model}'")

    folder = write_imagefolder(tmp_path / "moved", 4)
    source = open_source(str(folder))
    shutil.rmtree(folder)  # the same for a dataset
    with pytest.raises(SourceError) as raised:
        build_index(source, embedder, str(tmp_path / "two"), BuildOptions(skip_faces=False),
                    distributor=RayDistributor())
    assert type(raised.value) is SourceError
    assert str(raised.value) == f"{folder} is neither a local folder or .parquet file nor a hub id like 'org/name'."


def test_an_address_where_no_cluster_answers_is_one_line_saying_what_to_do(tmp_path, tiny_vit):
    folder = write_imagefolder(tmp_path / "images", 2)
    done = subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(folder), "--model", str(tiny_vit),
                           "--out", str(tmp_path / "idx"), "--ray", "127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: Nothing answers at 127.0.0.1:9: start the cluster there with `ray start --head` (it prints the "
        "address to pass), or pass --ray auto to run on this machine."]


def test_the_builder_imports_ray_only_for_a_ray_build():
    code = ("import sys, index_builder.__main__, index_builder.build, index_builder.add, dino_demo.engine; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
