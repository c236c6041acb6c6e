"""Settings: each declared once, and the environment, the command line and the README all follow it."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import ROOT

from dino_demo.config import Settings, SettingsError, env_table, option_name


def test_settings_from_env_and_overrides():
    settings = Settings.from_env({"DINO_K": "5", "DINO_FACE_GATE": "0", "DINO_INDEX": "hf://a/b", "DINO_PORT": ""})
    assert (settings.k, settings.face_gate, settings.index, settings.port) == (5, False, "hf://a/b", 7860)
    assert settings.with_overrides(k=9, index=None).k == 9
    assert settings.with_overrides(index=None).index == "hf://a/b"
    assert Settings.from_env({"DINO_CACHE_DIR": "~/x"}).cache_dir == Path.home() / "x"
    assert Settings.from_env({"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"
    assert Settings.from_env({"GRADIO_SERVER_NAME": "0.0.0.0", "DINO_HOST": "::1"}).host == "::1"


@pytest.mark.parametrize("environ, message", [
    ({"DINO_K": "many"}, "DINO_K='many' is not a whole number"),
    ({"DINO_PORT": "0"}, "DINO_PORT='0' must be at least 1"),
    ({"DINO_SHARE": "maybe"}, "DINO_SHARE='maybe': use 1 or 0"),
    ({"DINO_BACKEND": "fast"}, "Unknown backend 'fast'"),
    ({"DINO_K": "60"}, "between 1 and 50"),
])
def test_unusable_values_are_refused_naming_the_variable(environ, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(environ)


def test_every_setting_has_help_and_a_variable_of_its_own():
    variables = [f.metadata["env"] for f in fields(Settings)]
    assert all(f.metadata["help"] for f in fields(Settings))
    assert all(v and v.startswith("DINO_") for v in variables) and len(set(variables)) == len(variables)


def test_the_readme_table_is_the_one_made_from_the_settings():
    readme = (ROOT / "README.md").read_text()
    table = env_table()
    assert table in readme, "README's variable table is out of date: paste `python -m dino_demo.config` over it"
    for f in fields(Settings):
        assert f"`{f.metadata['env']}` | `{option_name(f)}`" in table


def test_the_suite_keeps_every_cache_out_of_the_home_folder():
    import datasets
    from conftest import CACHE_ROOT
    from huggingface_hub import constants

    from dino_demo.config import DEFAULT_CACHE_DIR

    for cache in (DEFAULT_CACHE_DIR, Settings().cache_dir, datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE):
        assert Path(cache).is_relative_to(CACHE_ROOT), cache


def test_the_cache_folder_follows_xdg_cache_home():
    import subprocess
    import sys

    code = "from dino_demo.config import DEFAULT_CACHE_DIR; print(DEFAULT_CACHE_DIR)"
    for environ, expected in (({"XDG_CACHE_HOME": "/srv/cache"}, "/srv/cache/dino-demo"),
                              ({"XDG_CACHE_HOME": ""}, str(Path.home() / ".cache" / "dino-demo"))):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={"PATH": "", "HOME": str(Path.home()), **environ}, timeout=60)
        assert done.stdout.strip() == expected, done.stderr
