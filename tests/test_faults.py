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


# --- a living index: add, remove and compact killed at random points, a full disk, two writers -------------

def state(folder: Path) -> tuple:
    """An index folder's state: the ids, vectors and metadata a search sees, and the ids each segment stores."""
    index = load_index(folder)
    return (index.live_ids().tolist(), index.vectors().round(4).tobytes(), index.meta.drop(["source"]).to_pylist(),
            [s.ids.tolist() for s in index.segments])


@pytest.fixture(scope="module")
def extra_images(tmp_path_factory) -> Path:
    """Ten new pictures (other seeds than the first collection's)."""
    folder = tmp_path_factory.mktemp("extra") / "images"
    folder.mkdir()
    from conftest import make_image

    for seed in range(500, 510):
        make_image(seed).save(folder / f"new{seed}.png")
    return folder


CHANGES = {  # command -> its arguments after the index folder
    "add": lambda extra: ["add", "--index", "{index}", "--dataset", str(extra), "--workers", "0", "--batch-size", "1",
                          "--chunk-size", "1", "--device", "cpu"],
    "remove": lambda extra: ["remove", "--index", "{index}", "--ids", "1,4,7", "--where", "label=picture 9"],
    "compact": lambda extra: ["compact", "--index", "{index}"],
}


def prepared(kind: str, whole: Path, extra: Path, folder: Path) -> Path:
    """A copy of the finished index, ready for `kind` (compact has removed images to drop)."""
    shutil.copytree(whole, folder)
    if kind == "compact":
        assert build_main(["remove", "--index", str(folder), "--ids", "0,5,6"]) == 0
        assert build_main(CHANGES["add"](extra)[:1] + [a.replace("{index}", str(folder)) for a in CHANGES["add"](extra)[1:]]) == 0
    return folder


def command(kind: str, extra: Path, folder: Path) -> list[str]:
    return [a.replace("{index}", str(folder)) for a in CHANGES[kind](extra)]


@pytest.mark.parametrize("kind", ["add", "remove", "compact"])
def test_a_change_killed_at_three_random_points_leaves_the_state_before_or_after_and_a_rerun_completes(
        kind, whole, extra_images, tmp_path):
    reference = prepared(kind, whole, extra_images, tmp_path / "reference")
    before = state(reference)
    started = time.perf_counter()
    assert run_cli(*command(kind, extra_images, reference), log=tmp_path / "reference.log").wait(timeout=300) == 0
    took, after = time.perf_counter() - started, state(reference)
    assert before != after
    seed = int(time.time())
    folder = prepared(kind, whole, extra_images, tmp_path / "idx")
    outcomes = []
    for delay in sorted(np.random.default_rng(seed).uniform(0.2 * took, 1.1 * took, 3)):
        process = run_cli(*command(kind, extra_images, folder), log=tmp_path / f"kill-{delay:.2f}.log")
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        now = state(folder)  # opens, and is one whole state
        assert now in (before, after), f"seed {seed}: a mix after a kill at {delay:.2f}s of {took:.2f}s"
        outcomes.append("after" if now == after else "before")
    rerun = run_cli(*command(kind, extra_images, folder), log=tmp_path / "rerun.log")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()
    assert state(folder) == after, f"seed {seed}: outcomes {outcomes}"


@pytest.mark.parametrize("kind", ["add", "remove", "compact"])
def test_a_crash_at_any_rename_or_flush_of_a_change_leaves_the_state_before_or_after(
        kind, whole, extra_images, tmp_path, monkeypatch):
    """Every step that makes a change durable (each rename and each fsync) is a point where a crash
    may fall: stop at each in turn and check the folder."""
    import os as os_module

    from dino_demo import atomic

    reference = prepared(kind, whole, extra_images, tmp_path / "reference")
    before = state(reference)
    steps = []
    real_replace, real_fsync = os_module.replace, atomic.fsync
    monkeypatch.setattr(os_module, "replace", lambda *a: steps.append(1) or real_replace(*a))
    assert build_main(command(kind, extra_images, reference)) == 0
    after, total = state(reference), len(steps)
    assert total >= 2
    for crash_at in range(total):
        folder = prepared(kind, whole, extra_images, tmp_path / f"crash-{crash_at}")
        calls = []

        def replace(*args):
            calls.append(1)
            if len(calls) > crash_at:
                raise SystemExit(f"crashed at rename {crash_at}")
            return real_replace(*args)

        monkeypatch.setattr(os_module, "replace", replace)
        with pytest.raises(SystemExit):
            build_main(command(kind, extra_images, folder))
        monkeypatch.setattr(os_module, "replace", real_replace)
        assert state(folder) in (before, after), f"a mix after a crash at rename {crash_at} of {total}"
        assert build_main(command(kind, extra_images, folder)) == 0
        assert state(folder) == after


def test_a_full_disk_during_an_add_stops_it_clearly_and_the_index_opens_as_before(
        whole, extra_images, tmp_path, monkeypatch, capsys):
    folder = prepared("add", whole, extra_images, tmp_path / "idx")
    before = state(folder)
    fill_disk_after(monkeypatch, faiss, "write_index", good_calls=1)  # the new segment's image index, not its patches
    assert build_main(command("add", extra_images, folder)) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: No space left on device") and "rerun the same command" in message
    assert state(folder) == before
    monkeypatch.undo()
    assert build_main(command("add", extra_images, folder)) == 0
    assert load_index(folder).count == IMAGES + 10


def test_a_second_writer_is_refused_with_a_clear_message(whole, extra_images, tmp_path, capsys):
    from dino_demo.index_writer import hold_lock

    folder = prepared("add", whole, extra_images, tmp_path / "idx")
    before = state(folder)
    with hold_lock(folder):
        for kind in ("add", "remove", "compact"):
            assert build_main(command(kind, extra_images, folder)) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith("error: ") and "is being changed by process" in err and "wait for it" in err
        assert build_main(cli_args(extra_images, Path("unused"), folder) + ["--rebuild"]) == 2
    assert state(folder) == before
