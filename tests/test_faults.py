"""Faults: builds killed at random points or hitting a full disk lose nothing; a damaged index is
refused at start with a message naming the file."""
from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import ROOT, index_file, write_imagefolder

from dino_demo.index import GLOBAL, MANIFEST, META, PATCHES, load_index
from index_builder.__main__ import main as build_main

IMAGES = 30


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("fault-images") / "images", IMAGES)


def run_cli(*args, log: Path) -> subprocess.Popen:
    """Start the builder CLI; its output goes to `log` (a pipe nobody reads could fill and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "index_builder", *args], cwd=ROOT, stdout=f, stderr=f)


def finished_chunks(out: Path) -> int:
    return len([p for p in (out / "_build").glob("rows-*") if p.suffix == ""])


def cli_args(images: Path, model: Path, out: Path) -> list[str]:
    """One image per batch and per chunk: every row is a point where a build can be cut."""
    return ["--dataset", str(images), "--model", str(model), "--out", str(out), "--workers", "0", "--batch-size", "1",
            "--chunk-size", "1", "--no-skip-faces", "--device", "cpu"]


@pytest.fixture(scope="module")
def whole(images, tiny_vit, tmp_path_factory) -> Path:
    """The same build, never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "idx"
    assert build_main(cli_args(images, tiny_vit, out)) == 0
    return out


def assert_same_index(path: Path, reference: Path) -> None:
    """Exactly the same images, in the same order, with the same ids, metadata and vectors."""
    got, want = load_index(path), load_index(reference)
    assert got.count == want.count == IMAGES
    assert got.meta.column("source_row").to_pylist() == list(range(IMAGES))  # each image exactly once
    assert got.meta.equals(want.meta)  # ids, sizes, labels and thumbnails
    np.testing.assert_allclose(got.vectors(),
                               want.vectors(), atol=1e-5)
    total = want.patch_index.ntotal
    assert got.patch_index.ntotal == total
    np.testing.assert_allclose(all_patches(got), all_patches(want),
                               atol=1e-3)


def all_patches(index) -> np.ndarray:
    return np.concatenate([index.image_patches(int(i)) for i in index.live_ids()])


def test_a_build_killed_three_times_at_random_points_ends_with_the_same_index(images, tiny_vit, whole, tmp_path):
    seed = int(time.time())
    targets = sorted(np.random.default_rng(seed).choice(np.arange(2, IMAGES - 3), 3, replace=False))
    out, seen = tmp_path / "idx", []
    for target in targets:
        process = run_cli(*cli_args(images, tiny_vit, out), log=tmp_path / f"kill-{target}.log")
        deadline = time.time() + 240
        while finished_chunks(out) < target and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL, f"seed {seed}: finished before the kill at {target}"
        seen.append(finished_chunks(out))
        assert not (out / MANIFEST).exists()
    assert seen == sorted(seen) and seen[-1] < IMAGES, f"seed {seed}: chunks after each kill {seen}"
    resumed = run_cli(*cli_args(images, tiny_vit, out), log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert f"resumed at row {seen[-1]}" in (tmp_path / "resumed.log").read_text()
    assert_same_index(out, whole)


def fill_disk_after(monkeypatch, module, name: str, good_calls: int) -> None:
    """`module.name` (a file writer) succeeds `good_calls` times, then fails as on a full disk."""
    real, calls = getattr(module, name), []

    def writer(*args, **kwargs):
        calls.append(1)
        if len(calls) > good_calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, writer)


def finished_vectors(out: Path) -> np.ndarray:
    """The CLS vectors of the build's finished chunks, in order: (n, d) float32."""
    folders = sorted(p for p in (out / "_build").glob("rows-*") if p.suffix == "")
    return np.concatenate([np.load(folder / "cls.npy") for folder in folders])


def test_a_full_disk_while_writing_chunks_keeps_the_finished_ones_and_a_rerun_completes(
        images, tiny_vit, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "idx"
    fill_disk_after(monkeypatch, np, "save", good_calls=2 * 11)  # cls + patches of 11 chunks, then the 12th fails
    assert build_main(cli_args(images, tiny_vit, out)) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: No space left on device") and "rerun the same command" in message
    assert finished_chunks(out) == 11 and not (out / MANIFEST).exists()
    reference = load_index(whole).vectors()
    np.testing.assert_allclose(finished_vectors(out), reference[:11], atol=1e-5)  # the last good state, intact
    monkeypatch.undo()
    assert build_main(cli_args(images, tiny_vit, out)) == 0
    assert "resumed at row 11" in capsys.readouterr().err
    assert_same_index(out, whole)


def test_a_full_disk_while_assembling_the_index_leaves_no_half_index_and_a_rerun_completes(
        images, tiny_vit, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "idx"
    fill_disk_after(monkeypatch, faiss, "write_index", good_calls=1)  # global.faiss written, patches.faiss not
    assert build_main(cli_args(images, tiny_vit, out)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert finished_chunks(out) == IMAGES and not (out / MANIFEST).exists()
    with pytest.raises(Exception, match="unfinished build"):
        load_index(out)
    reference = load_index(whole).vectors()
    np.testing.assert_allclose(finished_vectors(out), reference, atol=1e-5)
    monkeypatch.undo()
    assert build_main(cli_args(images, tiny_vit, out)) == 0
    assert_same_index(out, whole)


# --- a damaged index is refused when the app starts ------------------------------------------------

def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what it should be" * 64)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [garbage, truncate, Path.unlink], ids=["corrupt", "truncated", "missing"])
@pytest.mark.parametrize("name", [GLOBAL, PATCHES, META, MANIFEST])
def test_the_app_refuses_to_start_on_a_damaged_index_naming_the_file(whole, tiny_vit, tmp_path, name, damage):
    from dino_demo.config import Settings
    from app import open_engine

    folder = Path(shutil.copytree(whole, tmp_path / "idx"))
    damage(index_file(folder, name))
    with pytest.raises(Exception, match=str(index_file(folder, name)).replace(".", r"\.")) as caught:
        open_engine(Settings(model=str(tiny_vit), index=str(folder), device="cpu", face_gate=False))
    assert "rebuild" in str(caught.value) or "unfinished build" in str(caught.value) or "not a finished" in str(
        caught.value)


def test_the_app_refuses_to_start_on_an_index_for_another_model(whole, tiny_dinov2):
    from dino_demo.config import Settings
    from app import open_engine

    with pytest.raises(Exception, match=f"The index at {whole} was built with .*tiny-dino-vit") as caught:
        open_engine(Settings(model=str(tiny_dinov2), index=str(whole), device="cpu", face_gate=False))
    assert "--model" in str(caught.value)
