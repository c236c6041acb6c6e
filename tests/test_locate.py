"""Where the app's index comes from: a folder, hf://USER/REPO, or the bundled collection indexed once."""
from __future__ import annotations

import pytest

from dino_demo.errors import HubUnreachable, UserError
from dino_demo.index import IndexFolderError, MANIFEST, load_index
from index_builder.locate import build_default_index, default_index_dir, locate_index


def test_default_collection_is_built_once_then_reused(tmp_path, embedder, image_folder):
    calls = []
    out = build_default_index(embedder, tmp_path, image_folder, skip_faces=False, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (12, 12)
    assert out == default_index_dir(tmp_path, embedder.model_id, embedder.input_size)
    manifest = (out / MANIFEST).read_bytes()
    calls.clear()
    again = build_default_index(embedder, tmp_path, image_folder, skip_faces=False, progress=lambda d, t: calls.append((d, t)))
    assert again == out and calls == [] and (out / MANIFEST).read_bytes() == manifest


def test_an_index_folder_is_located_as_given_and_checked_against_the_model_when_opened(
        tmp_path, embedder, image_folder, tiny_dinov2):
    from dino_demo.model import Embedder

    built = build_default_index(embedder, tmp_path / "cache", image_folder, skip_faces=False)
    assert locate_index(str(built)) == built
    assert load_index(built, embedder.describe()).count == 12
    with pytest.raises(IndexFolderError, match="does not match"):
        load_index(built, Embedder(str(tiny_dinov2), device="cpu").describe())


def test_hub_index_offline_fails_in_one_clear_line(monkeypatch, embedder, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable) as caught:
        locate_index("hf://someone/no-such-index")
    message = str(caught.value)
    assert "\n" not in message
    assert "someone/no-such-index" in message and "--index" in message
    with pytest.raises(UserError, match="hf://USER/REPO"):
        locate_index("hf://not-a-repo-id")


def test_upload_index_offline_fails_in_one_clear_line(monkeypatch, tmp_path, embedder, image_folder):
    from huggingface_hub import constants

    from index_builder.hub_upload import upload_index

    built = build_default_index(embedder, tmp_path / "cache", image_folder, skip_faces=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable) as caught:
        upload_index(built, "someone/my-index")
    assert "\n" not in str(caught.value) and "hf upload --repo-type dataset someone/my-index" in str(caught.value)
    with pytest.raises(UserError, match="not a finished index"):
        upload_index(tmp_path, "someone/my-index")
