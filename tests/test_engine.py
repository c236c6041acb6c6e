"""Engine: the path input -> limits -> face gate -> embed -> search/match -> pictures."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from conftest import make_image, write_imagefolder

from dino_demo.engine import Engine
from dino_demo.faces import FaceGate, FaceRefused
from dino_demo.geometry import BoxError
from dino_demo.images import ImageError
from dino_demo.index import load_index
from dino_demo.search import SearchError
from index_builder.locate import build_default_index


class CountingEmbedder:
    """Wraps a real embedder and counts the images it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.embedded, self.attended = inner, 0, 0

    def embed(self, images):
        self.embedded += len(images)
        return self.inner.embed(images)

    def attend(self, images):
        self.attended += len(images)
        return self.inner.attend(images)

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
    index = load_index(build_default_index(embedder, tmp_path_factory.mktemp("cache"), folder, skip_faces=False))
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
    for item in results.items:  # nothing drawn: the stored thumbnail's own bytes go with its picture
        stored = engine.index.row(item.id)["thumbnail"]
        assert item.jpeg == stored and item.picture.size == Image.open(io.BytesIO(stored)).size


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
        assert item.jpeg is None  # a box is drawn on it: the picture, not the stored bytes


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
    with pytest.raises(BoxError, match="no area"):
        engine.search_region(image, (5, 5, 5, 40), 3)
    assert engine.embedder.embedded == 0  # each was refused before the model ran


def test_result_pictures_have_the_box_drawn(engine, indexed):
    folder = indexed[0]
    results = engine.search_region(str(folder / "img000.jpg"), (0, 0, 96, 72), k=1)
    item = results.items[0]
    plain = np.asarray(engine.result_image(item.id), dtype=int)
    drawn = np.asarray(item.picture, dtype=int)
    assert np.abs(plain - drawn).sum() > 0  # something was drawn on the thumbnail


# --- what DINO sees ------------------------------------------------------------------------------

class FaceInFrame:
    """A stub detector that finds a "face" only in pictures with a white square in the top-left corner,
    and counts the pictures it was shown."""

    def __init__(self):
        self.seen = 0

    def __call__(self, rgb):
        self.seen += 1
        return [((0, 0, 16, 16), 0.99)] if rgb[4:12, 4:12].min() > 220 else []


def test_what_dino_sees_draws_maps_mask_and_colours_with_the_mask_in_json(engine, indexed):
    from dino_demo.attention import pixel_mask
    from conftest import make_image

    image = make_image(3, (200, 120))
    result = engine.what_dino_sees(image, 60)
    heads = result.sight.heads
    assert heads.shape[0] == 2 and result.maps.width > result.maps.height  # photo, mean and 2 heads in a row
    assert result.mask.size == result.colours.size == (200, 120)
    out = json.loads(json.dumps(result.to_json()))
    assert out["share"] == 60 and out["heads"] == 2 and out["width"] == 200 and out["height"] == 120
    assert 0 < out["mask"]["share"] <= 1 and {"model", "colours", "draw", "total"} <= set(out["timings_ms"])
    assert out["model"].startswith("tiny-dino-vit")
    # the share of attention held by the mask is at least the share asked for
    mean = heads.mean(axis=0)
    assert mean[result.sight.mask].sum() >= 0.6 * mean.sum() - 1e-6
    # what lies outside the mask is dimmed in the picture
    inside = pixel_mask(result.sight.mask, (200, 120))
    shown, original = np.asarray(result.mask, float), np.asarray(image, float)
    assert shown[~inside].mean() < 0.5 * original[~inside].mean()
    assert (engine.embedder.embedded, engine.embedder.attended) == (0, 1)  # one pass gives attention and features


@pytest.mark.parametrize("share", [0, 101, "lots", None, True])
def test_a_share_outside_1_to_100_is_refused(engine, share):
    from conftest import make_image
    from dino_demo.errors import UserError

    with pytest.raises(UserError, match="percentage from 1 to 100"):
        engine.what_dino_sees(make_image(1), share)


def test_a_clip_gives_a_video_and_a_mask_per_frame(engine, tmp_path):
    from conftest import write_clip
    from dino_demo.frames import read_clip

    clip = write_clip(tmp_path / "pan.mp4", seconds=2, fps=24)
    shown = []
    result = engine.what_dino_sees_video(str(clip), 60, tmp_path / "out", lambda f, what: shown.append(f))
    out = json.loads(json.dumps(result.to_json()))
    assert len(out["frames"]) == 16 and [f["frame"] for f in out["frames"]] == list(range(16))
    assert out["frames"][1]["time"] == pytest.approx(0.125, abs=0.01)
    assert all(0 < f["mask"]["share"] <= 1 for f in out["frames"])
    assert {"decode", "face_gate", "model", "draw", "encode", "total"} <= set(out["timings_ms"])
    assert out["seconds_per_frame"] > 0
    video = read_clip(result.video)
    assert len(video.frames) == 16 and video.size[0] > 1.9 * video.size[1]  # mask | colours, side by side
    assert shown == sorted(shown) and shown[-1] < 1


def test_a_face_in_any_frame_refuses_the_clip_before_any_frame_is_analysed(indexed, tmp_path):
    from conftest import write_clip
    from dino_demo.faces import FaceRefused
    from dino_demo.frames import read_clip, write_video

    _, embedder, index = indexed
    detector = FaceInFrame()
    engine = Engine(CountingEmbedder(embedder), index, FaceGate(detector=detector, turns=(0,)), 40_000_000, 25_000_000)
    frames = read_clip(write_clip(tmp_path / "pan.mp4", seconds=2, fps=8)).frames
    frames[11].paste((255, 255, 255), (0, 0, 16, 16))  # the stub's "face"
    white = write_video(frames, 8, tmp_path / "white.mp4")
    out = tmp_path / "out"
    with pytest.raises(FaceRefused, match=r"Frame 12 of the clip \(at 1\.4 s\) shows a person's face.*another clip"):
        engine.what_dino_sees_video(str(white), 60, out)
    assert detector.seen == 12 and engine.embedder.attended == 0  # checked up to the face; the model saw none
    assert not out.exists() or not any(out.iterdir())


def test_co_segment_colours_both_images_side_by_side(engine):
    from conftest import make_image

    result = engine.co_segment(make_image(1, (160, 120)), make_image(1, (160, 120)))
    assert result.picture.height == 120 and result.picture.width > 2 * 160
    out = json.loads(json.dumps(result.to_json()))
    assert len(out["images"]) == 2 and {"embed", "colours", "draw"} <= set(out["timings_ms"])
    # an image with itself: every patch's best match is itself
    assert out["images"][0]["mean_best_similarity"] == pytest.approx(1.0, abs=1e-4)


def test_matching_runs_at_its_own_input_size_while_searches_keep_the_indexs(indexed):
    """--match-input-size: the same weights see a larger input for matching and co-segmentation (finer
    patches, boxes exact on the finer grid); a search still embeds at the index's size, or it could not
    compare its patches with the stored ones."""
    from dino_demo.config import Settings
    from dino_demo.geometry import patch_centres

    folder, embedder, index = indexed
    engine = Engine.from_settings(Settings(match_input_size=128), embedder, index, FaceGate(detector=no_faces))
    assert engine.embedder is embedder and engine.match_embedder.input_size == 128
    assert engine.match_embedder.model is embedder.model
    a = make_image(1, (96, 72))
    result = engine.match(a, a.copy(), box=(0, 0, 48, 36))  # the top-left quarter of A, on an 8 x 8 grid
    assert len(result.matches) == 16  # 4 x 4 finer cells under the box, each its own best buddy
    centres = patch_centres((96, 72), (8, 8))
    assert {tuple(p) for p in result.matches.points_a} == {tuple(c) for c in centres if c[0] < 48 and c[1] < 36}
    assert result.to_json()["grid"] == [8, 8]  # a client learns the patch grid the pairs come from
    parts = engine.co_segment(a, a.copy()).parts
    assert parts.colours[0].shape[:2] == (8, 8) and parts.to_json()["grid"] == [8, 8]
    hits = engine.search_region(str(folder / "img003.jpg"), (0, 0, 60, 60), k=1)
    assert hits.items[0].label == "picture 3"
    same = Engine.from_settings(Settings(), embedder, index, FaceGate(detector=no_faces))
    assert same.match_embedder is embedder
    coarse = same.match(a, a.copy(), box=(0, 0, 48, 36))
    assert len(coarse.matches) == 4 and coarse.to_json()["grid"] == [4, 4]  # 2 x 2 cells of the 4 x 4 grid


def test_a_serving_engine_runs_blas_on_one_thread(indexed):
    """Engine.from_settings (the app's engine) leaves numpy's and FAISS's OpenBLAS on one thread: their
    idle threads spin after each small product and take the cores every other step of a request needs."""
    import threadpoolctl

    from dino_demo.config import Settings

    _, embedder, index = indexed
    blas = lambda: [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]  # noqa: E731
    before = threadpoolctl.threadpool_limits(2, user_api="blas")  # as numpy starts on a machine of 2 or more cores
    try:
        assert blas()  # numpy's OpenBLAS at least
        Engine.from_settings(Settings(), embedder, index, FaceGate(detector=no_faces))
        assert set(blas()) == {1}
    finally:
        before.restore_original_limits()


def test_after_warm_up_the_first_requests_make_nothing_on_first_use(tmp_path, tiny_vit, indexed, monkeypatch):
    """Engine.warm_up (the app runs it as it starts) loads the face gate's detectors in every worker, runs the
    model and makes the attention export, so the first search and What DINO sees load none of them."""
    from dino_demo import faces, model
    from dino_demo.model import Embedder

    folder, _, index = indexed
    embedder = Embedder(str(tiny_vit), device="cpu", backend="onnx", cache_dir=tmp_path / "onnx")
    gate = FaceGate(workers=2)
    engine = Engine(embedder, index, gate, 40_000_000, 25_000_000, match_embedder=embedder.at_input_size(448))
    try:
        engine.warm_up()
        assert len(gate._made) == 2 and embedder._onnx_attention is not None

        def made_on_first_use(*args, **kwargs):
            raise AssertionError("made by a request, not by warm_up")

        monkeypatch.setattr(faces.MediaPipeDetector, "__init__", made_on_first_use)
        monkeypatch.setattr(model, "load_onnx_model", made_on_first_use)
        photo = str(sorted(folder.glob("*.jpg"))[0])
        assert engine.search_image(photo, 3).items
        assert engine.what_dino_sees(photo).mask is not None
        assert engine.match(photo, photo).matches is not None
    finally:
        gate.close()
