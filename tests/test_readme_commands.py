"""The README's commands work as written after the Quick start: one form throughout (the venv active)."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_the_quick_start_activates_the_venv_and_nothing_after_it_reaches_into_it():
    quick = [b for b in BLOCKS if "python3 -m venv .venv" in b]
    assert len(quick) == 2 and all(". .venv/bin/activate &&" in b for b in quick)
    rest = [line for b in BLOCKS if b not in quick for line in b.splitlines()]
    assert rest and not [line for line in rest if ".venv/bin/" in line]
    assert not re.search(r"`\.venv/bin/(python|pip|hf)", README)


def test_ci_runs_the_readmes_test_command():
    test_command = next(b.strip() for b in BLOCKS if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.replace("pip install", "pip install -q") in ci


def test_the_commands_the_messages_name_come_with_the_requirements():
    # Offline errors tell people to run `hf download ...`: in the active venv it is there.
    assert (Path(sys.executable).parent / "hf").exists() or shutil.which("hf")
    assert "`hf download" in README
