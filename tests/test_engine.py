"""Engine: the path input -> limits -> face gate -> embed -> search/match -> pictures, and where its index comes from."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import make_image, write_imagefolder

from dino_demo.config import Settings
from dino_demo.engine import Engine, FaceRefused, build_default_index, default_index_dir, open_index
from dino_demo.errors import HubUnreachable
from dino_demo.faces import FaceGate
from dino_demo.images import ImageError
from dino_demo.search import SearchError


class CountingEmbedder:
    """Wraps a real embedder and counts the images it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.embedded = inner, 0

    def embed(self, images):
        self.embedded += len(images)
        return self.inner.embed(images)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def no_faces(rgb):
    return []


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_vit):
    """12 generated images indexed with the tiny model (built through the default-collection path)."""
    from dino_demo.model import Embedder

    folder = write_imagefolder(tmp_path_factory.mktemp("collection") / "images", 12)
    embedder = Embedder(str(tiny_vit), device="cpu")
    index = open_index(None, embedder, tmp_path_factory.mktemp("cache"), folder, skip_faces=False)
    return folder, embedder, index


@pytest.fixture
def engine(indexed):
    _, embedder, index = indexed
    return Engine(CountingEmbedder(embedder), index, FaceGate(detector=no_faces), 40_000_000, 25_000_000, max_k=20)


def test_an_indexed_image_finds_itself_first(engine, indexed):
    folder = indexed[0]
    results = engine.search_image(str(folder / "img005.jpg"), k=3)
    assert results.items[0].label == "picture 5"
    assert results.items[0].score == pytest.approx(1.0, abs=1e-4)
    assert [i.score for i in results.items] == sorted((i.score for i in results.items), reverse=True)
    assert json.loads(json.dumps(results.to_json()))["results"][0]["label"] == "picture 5"
    assert {"load", "embed", "search", "draw", "total"} <= set(results.timings)


def test_search_similar_uses_the_stored_vector_without_embedding(engine):
    results = engine.search_similar(7, k=2)
    assert results.items[0].id == 7 and engine.embedder.embedded == 0
    with pytest.raises(SearchError, match="no image 99"):
        engine.search_similar(99, k=2)


def test_region_result_box_lies_inside_the_hit_image(engine, indexed):
    folder = indexed[0]
    results = engine.search_region(str(folder / "img003.jpg"), (10, 5, 60, 50), k=4, heat=True)
    assert results.items[0].label == "picture 3"
    assert results.box == (10.0, 5.0, 60.0, 50.0)
    for item in results.items:
        w, h = item.size
        x0, y0, x1, y1 = item.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert item.picture.size == engine.result_image(item.id).size


def test_match_finds_mutual_pairs_and_draws_them(engine):
    a, b = make_image(1, (96, 72)), make_image(1, (96, 72))
    result = engine.match(a, b, n=5)
    assert len(result.matches) == 16  # identical images: every patch is its own best buddy
    assert result.summary.startswith("16 matches, mean similarity 1.000")
    assert len(result.to_json()["pairs"]) == 5
    assert result.picture.height == 72


def test_face_photo_is_refused_before_embedding(indexed):
    import matplotlib.cbook

    _, embedder, index = indexed
    spy = CountingEmbedder(embedder)
    engine = Engine(spy, index, FaceGate(), 40_000_000, 25_000_000)  # the real MediaPipe gate
    face = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with pytest.raises(FaceRefused, match="This image shows a person's face"):
        engine.search_image(face, k=3)
    with pytest.raises(FaceRefused):
        engine.search_region(face, (0, 0, 100, 100), k=3)
    with pytest.raises(FaceRefused):
        engine.match(make_image(2), face)
    assert spy.embedded == 0


def test_limits_and_bad_k_are_refused_with_clear_messages(engine):
    image = make_image(3, (400, 300))
    small = Engine(engine.embedder, engine.index, engine.gate, max_pixels=10_000, max_bytes=25_000_000)
    with pytest.raises(ImageError, match="megapixels"):
        small.search_image(image, 3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    tiny_upload = Engine(engine.embedder, engine.index, engine.gate, max_pixels=10**8, max_bytes=1000)
    with pytest.raises(ImageError, match="limit"):
        tiny_upload.search_image(buffer.getvalue(), 3)
    for k in (0, 21, 2.5, "3"):
        with pytest.raises(SearchError, match="between 1 and 20"):
            engine.search_image(image, k)
    with pytest.raises(SearchError, match="no area"):
        engine.search_region(image, (5, 5, 5, 40), 3)
    assert engine.embedder.embedded == 0  # each was refused before the model ran


def test_default_collection_is_built_once_then_reused(tmp_path, embedder, image_folder):
    calls = []
    out = build_default_index(embedder, tmp_path, image_folder, skip_faces=False, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (12, 12)
    assert out == default_index_dir(tmp_path, embedder.model_id, embedder.input_size)
    manifest = (out / "manifest.json").read_bytes()
    calls.clear()
    again = build_default_index(embedder, tmp_path, image_folder, skip_faces=False, progress=lambda d, t: calls.append((d, t)))
    assert again == out and calls == [] and (out / "manifest.json").read_bytes() == manifest


def test_engine_open_builds_the_default_index_then_serves_it(tmp_path, tiny_vit, image_folder):
    settings = Settings(model=str(tiny_vit), device="cpu", cache_dir=tmp_path, collection=image_folder, face_gate=False)
    first = Engine.open(settings, progress=lambda d, t: None)
    assert first.index.count == 12
    built = []
    second = Engine.open(settings, progress=lambda d, t: built.append(d))
    assert built == [] and second.index.count == 12
    assert second.search_image(str(image_folder / "img000.jpg"), 1).items[0].label == "picture 0"


def test_hub_index_offline_fails_in_one_clear_line(monkeypatch, embedder, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable) as caught:
        open_index("hf://someone/no-such-index", embedder, tmp_path, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "someone/no-such-index" in message and "--index" in message


def test_index_folder_is_opened_and_checked_against_the_model(indexed, tmp_path, tiny_dinov2):
    from dino_demo.index import IndexFolderError
    from dino_demo.model import Embedder

    _, embedder, index = indexed
    assert open_index(str(index.path), embedder, tmp_path, tmp_path).count == 12
    with pytest.raises(IndexFolderError, match="does not match"):
        open_index(str(index.path), Embedder(str(tiny_dinov2), device="cpu"), tmp_path, tmp_path)


def test_settings_from_env_and_overrides():
    settings = Settings.from_env({"DINO_K": "5", "DINO_FACE_GATE": "0", "DINO_INDEX": "hf://a/b", "DINO_PORT": ""})
    assert (settings.k, settings.face_gate, settings.index, settings.port) == (5, False, "hf://a/b", 7860)
    assert settings.with_overrides(k=9, index=None).k == 9
    assert settings.with_overrides(index=None).index == "hf://a/b"
    from dino_demo.config import SettingsError

    with pytest.raises(SettingsError, match="DINO_K"):
        Settings.from_env({"DINO_K": "many"})
    with pytest.raises(SettingsError, match="DINO_SHARE"):
        Settings.from_env({"DINO_SHARE": "maybe"})


def test_result_pictures_have_the_box_drawn(engine, indexed):
    folder = indexed[0]
    results = engine.search_region(str(folder / "img000.jpg"), (0, 0, 96, 72), k=1)
    item = results.items[0]
    plain = np.asarray(engine.result_image(item.id), dtype=int)
    drawn = np.asarray(item.picture, dtype=int)
    assert np.abs(plain - drawn).sum() > 0  # something was drawn on the thumbnail


def test_upload_index_offline_fails_in_one_clear_line(monkeypatch, indexed, tmp_path):
    from huggingface_hub import constants

    from index_builder.hub_upload import upload_index

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable) as caught:
        upload_index(indexed[2].path, "someone/my-index")
    assert "\n" not in str(caught.value) and "hf upload --repo-type dataset someone/my-index" in str(caught.value)
    from dino_demo.errors import UserError

    with pytest.raises(UserError, match="not a finished index"):
        upload_index(tmp_path, "someone/my-index")
