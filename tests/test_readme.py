"""The README's client API example runs, as written, against the running app."""
import contextlib
import io
import os
import re

from conftest import ROOT


def readme_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- api-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert found, "README lost its client API example"
    return found.group(1)


def test_readme_client_example_runs_against_the_app(app_server, monkeypatch):
    url, _ = app_server
    code = readme_api_example()
    assert 'Client("http://127.0.0.1:7860/")' in code
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), {})
    lines = [l for l in out.getvalue().strip().splitlines() if not l.startswith("Loaded as API")]
    assert len(lines) == 3
    assert "marigold flower', 1.0)" in lines[0]  # the image finds itself first
    assert "ladybird" in lines[1]
    assert re.match(r"\d+ matches, mean similarity 0\.\d+ \{'a': \[", lines[2])
