"""app.py: options made from the settings, environment then command line, and the engine it opens."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
from conftest import ROOT

from app import build_parser, load_settings, open_engine
from dino_demo.config import Settings


def test_there_is_one_option_per_setting_and_none_given_means_the_defaults():
    options = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert options == {f.name for f in fields(Settings)}
    assert load_settings([], {}) == Settings()


def test_the_command_line_wins_over_the_environment():
    environ = {"DINO_K": "5", "DINO_PORT": "9000", "DINO_FACE_GATE": "1", "DINO_CACHE_DIR": "/tmp/a"}
    settings = load_settings(["--k", "7", "--allow-faces", "--cache-dir", "/tmp/b"], environ)
    assert (settings.k, settings.port, settings.face_gate, settings.cache_dir) == (7, 9000, False, Path("/tmp/b"))
    assert load_settings(["--no-face-gate"], {}).face_gate is False
    assert load_settings(["--face-gate"], {"DINO_FACE_GATE": "0"}).face_gate is True
    assert load_settings(["--share", "--backend", "torch"], {}).share is True


def test_an_unusable_option_stops_with_a_message_naming_it(capsys):
    with pytest.raises(SystemExit) as stopped:
        load_settings(["--port", "0"], {})
    assert stopped.value.code == 2
    assert "--port='0' must be at least 1" in capsys.readouterr().err


def test_help_loads_neither_torch_nor_gradio():
    code = ("import sys, app\ntry:\n    app.build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'gradio', 'faiss', 'transformers', 'mediapipe') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DINO_MODEL" in done.stdout and "HEAVY []" in done.stdout


def test_open_engine_builds_the_default_index_then_serves_it(tmp_path, tiny_vit, image_folder):
    settings = Settings(model=str(tiny_vit), device="cpu", cache_dir=tmp_path, collection=image_folder, face_gate=False)
    first = open_engine(settings, progress=lambda d, t: None)
    assert first.index.count == 12
    built = []
    second = open_engine(settings, progress=lambda d, t: built.append(d))
    assert built == [] and second.index.count == 12
    assert second.search_image(str(image_folder / "img000.jpg"), 1).items[0].label == "picture 0"


@pytest.fixture(scope="module")
def dinov2_index(tmp_path_factory, tiny_dinov2):
    """An index built with the tiny DINOv2 at 112 px (not its own 56): the app must take both from the manifest."""
    from conftest import write_imagefolder
    from dino_demo.model import Embedder
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    folder = write_imagefolder(tmp_path_factory.mktemp("collection") / "images", 5)
    out = tmp_path_factory.mktemp("indexes") / "dinov2"
    build_index(open_source(str(folder)), Embedder(str(tiny_dinov2), device="cpu", input_size=112), str(out),
                BuildOptions(workers=0, skip_faces=False))
    return out, folder


def test_an_index_is_served_with_the_model_and_input_size_it_was_built_with(dinov2_index, tiny_dinov2, tmp_path):
    out, folder = dinov2_index
    engine = open_engine(Settings(index=str(out), device="cpu", cache_dir=tmp_path, face_gate=False))
    assert engine.embedder.model_id == str(tiny_dinov2) and engine.embedder.input_size == 112
    assert engine.search_image(str(folder / "img002.jpg"), 1).items[0].label == "picture 2"


def test_matching_may_see_a_larger_input_than_the_index_and_a_bad_size_is_one_line(dinov2_index, tmp_path):
    from dino_demo.errors import UserError

    assert load_settings(["--match-input-size", "448"], {}).match_input_size == 448
    assert load_settings([], {"DINO_MATCH_INPUT_SIZE": "224"}).match_input_size == 224
    out, _ = dinov2_index
    settings = Settings(index=str(out), device="cpu", cache_dir=tmp_path, face_gate=False, backend="torch")
    engine = open_engine(replace(settings, match_input_size=224))
    assert engine.embedder.input_size == 112 and engine.match_embedder.grid == (16, 16)
    assert engine.match_embedder.model is engine.embedder.model
    with pytest.raises(UserError, match="^Input size 100 is not a multiple of the patch size 14.$"):
        open_engine(replace(settings, match_input_size=100))


def test_a_hub_index_is_served_with_its_own_model_too(dinov2_index, tiny_dinov2, tmp_path, monkeypatch):
    from index_builder import locate

    out, _ = dinov2_index
    monkeypatch.setattr(locate, "download_index", lambda repo: out if repo == "someone/dinov2-index" else None)
    engine = open_engine(Settings(index="hf://someone/dinov2-index", device="cpu", cache_dir=tmp_path, face_gate=False))
    assert engine.embedder.model_id == str(tiny_dinov2) and engine.index.count == 5


def test_a_model_given_that_differs_from_the_index_is_refused(dinov2_index, tiny_vit, tmp_path):
    from dino_demo.index import IndexFolderError

    out, _ = dinov2_index
    with pytest.raises(IndexFolderError, match=f"built with {out.parent}|built with .*tiny-dinov2.*--model"):
        open_engine(Settings(model=str(tiny_vit), index=str(out), device="cpu", cache_dir=tmp_path, face_gate=False))


def test_an_index_whose_model_cannot_be_found_says_so_and_how_to_point_at_one(dinov2_index, tmp_path):
    import json
    import shutil

    from dino_demo.errors import UserError

    out = shutil.copytree(dinov2_index[0], tmp_path / "moved")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["id"] = str(tmp_path / "gone" / "tiny-dinov2")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as caught:
        open_engine(Settings(index=str(out), device="cpu", cache_dir=tmp_path, face_gate=False))
    message = str(caught.value)
    assert "\n" not in message and "The index was built with" in message and "--model" in message


def test_the_app_starts_quietly_with_a_start_line_of_its_own(tmp_path, tiny_vit):
    """`python app.py` as a person runs it, with the real face gate: no library chatter, one line saying
    where it is, what it serves, the model, the gate and how to share."""
    import os
    import time

    from conftest import free_port, write_imagefolder

    port = free_port()
    collection = write_imagefolder(tmp_path / "photos", 3)
    command = [sys.executable, "app.py", "--model", str(tiny_vit), "--device", "cpu", "--backend", "torch",
               "--collection", str(collection), "--cache-dir", str(tmp_path / "cache"), "--port", str(port)]
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 240
            while "DINO image search at" not in log.read_text() and time.monotonic() < deadline:
                assert server.poll() is None, log.read_text()
                time.sleep(0.5)
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = log.read_text()
    line = next(l for l in text.splitlines() if l.startswith("DINO image search at"))
    assert f"http://127.0.0.1:{port}" in line and "3 images" in line and "tiny-dino-vit on cpu (torch)" in line
    assert "face gate on" in line and "--share" in line
    for chatter in ("W0000", "XNNPACK", "absl", "share=True", "Running on local URL"):
        assert chatter not in text, chatter


def test_a_failed_warm_up_is_one_line_and_the_app_carries_on(capsys):
    import app

    class Broken:
        def warm_up(self):
            raise RuntimeError("MediaPipe could not load its graph")

    app.warm_up(Broken())
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: warming up failed (RuntimeError: MediaPipe could not load its graph); "
                                "the first requests will take longer"]
