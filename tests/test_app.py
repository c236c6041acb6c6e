"""app.py: options made from the settings, environment then command line, and the engine it opens."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
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
