"""The README's client API example runs, as written, against the running app."""
import contextlib
import io
import os
import re

import httpx
import pytest

from conftest import ROOT


def readme_api_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- api-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert len(found) == 2, "README lost a client API example"
    return found


def run_example(code: str, url: str) -> list[str]:
    """The lines an example prints, run against the app at `url`."""
    assert 'Client("http://127.0.0.1:7860/")' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), {})
    return [l for l in out.getvalue().strip().splitlines() if not l.startswith("Loaded as API")]


def test_readme_what_dino_sees_example_runs_against_the_app(app_server, monkeypatch):
    url, _ = app_server
    monkeypatch.chdir(ROOT)
    lines = run_example(readme_api_examples()[1], url)
    assert lines[0].startswith("tiny-dino-vit (DINO) 0.")
    assert re.match(r"32 0\.0 0\.\d+", lines[-2])  # 4 s sampled at 8 frames a second
    assert re.match(r"\[0\.\d+, 0\.\d+\]", lines[-1])


def test_readme_client_example_runs_against_the_app(app_server, monkeypatch):
    url, _ = app_server
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository
    lines = run_example(readme_api_examples()[0], url)
    assert len(lines) == 3
    assert "marigold flower', 1.0)" in lines[0]  # the image finds itself first
    assert "ladybird" in lines[1]
    assert re.match(r"\d+ matches, mean similarity 0\.\d+ \{'a': \[", lines[2])


def readme_block(marker: str) -> str:
    """The one python block of the README after `<!-- marker ... -->`."""
    (code,) = re.findall(rf"<!-- {marker}.*?-->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return code


def printed(code: str, url: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), {})
    return out.getvalue()


def test_readme_plain_http_example_runs_against_the_app(app_server, monkeypatch):
    url, _ = app_server
    monkeypatch.chdir(ROOT)
    code = readme_block("http-example")
    assert 'base_url="http://127.0.0.1:7860/"' in code
    assert "marigold flower', 1.0)" in printed(code, url)  # the same answer as through gradio_client
    # A refusal comes back as the error event the example raises with the app's message.
    refused = code.replace("assets/collection/mate-red-marigold.jpg", str(ROOT / "README.md"))
    with pytest.raises(RuntimeError, match="This file is not an image Pillow can read"):
        printed(refused, url)


def test_readme_client_with_one_tls_context_runs_against_the_app(app_server, monkeypatch):
    url, _ = app_server
    monkeypatch.chdir(ROOT)
    code = readme_block("tls-example")
    assert 'ssl_verify=ssl.create_default_context()' in code and "download_files=False" in code
    shown = printed(code, url)
    assert "marigold flower', 1.0)" in shown  # the same answer as with the client's defaults
    picture = shown.splitlines()[-1]  # the first result picture's URL, left on the server
    assert picture.startswith(url) and httpx.get(picture).headers["content-type"] == "image/jpeg"
