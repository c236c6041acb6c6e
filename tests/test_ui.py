"""The UI's handlers, called directly with a fake engine (no page, no server), and the page's public API."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import gradio as gr
from gradio import processing_utils
from gradio import utils as gr_utils
from gradio_image_annotation import image_annotator

from dino_demo.backbones import short_name
from dino_demo.config import BUNDLED_COLLECTION, Settings
from dino_demo.engine import MatchResult, ResultItem, SearchResults
from dino_demo.errors import UserError
from dino_demo.matching import MATCH_LINES, Matches
from dino_demo.ui import EXAMPLE_PAIRS, EXAMPLE_QUERIES, EXAMPLE_REGIONS, Handlers, build_ui, gallery_of, uploaded_file

FILE_META = {"_type": "gradio.FileData"}
PUBLIC = {"search_image", "search_region", "match_patches", "co_segment", "what_dino_sees", "what_dino_sees_video"}


def quiet(*args, **kwargs) -> None:
    """Stands in for gr.Progress, which only works inside a request."""


def tile(colour: str) -> Image.Image:
    return Image.new("RGB", (8, 6), colour)


def search_results(ids: list[int]) -> SearchResults:
    items = [ResultItem(i, 1.0 - i / 100, f"photo {i}", (80, 60), tile("red")) for i in ids]
    return SearchResults(items, query_size=(640, 480), timings={"total": 1.0})


def match_result(count: int = 3) -> MatchResult:
    points = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
    matches = Matches(np.arange(count), np.arange(count), np.linspace(0.9, 0.5, count), points, points + 1, None)
    return MatchResult(tile("blue"), matches, shown=count)


class FakeEngine:
    """Records each call with its arguments and answers with real result objects; `fail` is raised instead."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail
        self.index = SimpleNamespace(count=3)
        self.embedder = SimpleNamespace(model_id="facebook/dinov2-small")
        self.model_name = "dinov2-small (DINOv2 without registers: ...)"

    def _called(self, name: str, *args, progress=None):
        self.calls.append((name, *args))
        if progress is not None:
            progress(0.5, f"{name} halfway")
        if self.fail is not None:
            raise self.fail

    def search_image(self, source, k, progress=None):
        self._called("search_image", source, k, progress=progress)
        return search_results([4, 7])

    def search_similar(self, image_id, k, progress=None):
        self._called("search_similar", image_id, k, progress=progress)
        return search_results([image_id, 1])

    def search_region(self, source, box, k, heat=False, progress=None):
        self._called("search_region", source, box, k, heat, progress=progress)
        return search_results([2])

    def match(self, source_a, source_b, box=None, n=MATCH_LINES, progress=None):
        self._called("match", source_a, source_b, box, n, progress=progress)
        return match_result()

    def co_segment(self, source_a, source_b, progress=None):
        self._called("co_segment", source_a, source_b, progress=progress)
        return SimpleNamespace(picture=tile("cyan"), to_json=lambda: {"images": []})

    def what_dino_sees(self, source, share, progress=None):
        self._called("what_dino_sees", source, share, progress=progress)
        return SimpleNamespace(maps=tile("red"), mask=tile("green"), colours=tile("blue"),
                               to_json=lambda: {"share": share})

    def what_dino_sees_video(self, source, share, out_dir, progress=None):
        self._called("what_dino_sees_video", source, share, out_dir, progress=progress)
        return SimpleNamespace(video=Path(out_dir) / "result.mp4", to_json=lambda: {"frames": []})

    def result_image(self, image_id):
        self.calls.append(("result_image", image_id))
        return tile("green")


@pytest.fixture
def uploaded(upload_dir) -> str:
    path = upload_dir / "query.jpg"
    tile("white").save(path)
    return str(path.resolve())


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def select(index) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": None})


def annotated(image: str, *boxes: dict) -> dict:
    return {"image": {"path": image, "meta": FILE_META}, "boxes": list(boxes)}


# --- image retrieval -----------------------------------------------------------------------------

def test_search_image_passes_the_uploaded_path_and_an_int_k_and_returns_gallery_json_and_ids(engine, uploaded):
    gallery, result_json, ids = Handlers(engine).search_image({"path": uploaded, "meta": FILE_META}, 5.0,
                                                              progress=quiet)
    assert engine.calls == [("search_image", uploaded, 5)]
    assert type(engine.calls[0][2]) is int  # a slider sends 5.0; the engine takes whole numbers only
    assert [caption for _, caption in gallery] == ["photo 4 · 0.960", "photo 7 · 0.930"]
    assert all(Image.open(picture).format == "JPEG" for picture, _ in gallery)  # files Gradio only names
    assert result_json == search_results([4, 7]).to_json()
    assert ids == [4, 7]


def test_a_thumbnail_shown_as_stored_goes_out_as_its_own_jpeg_file_and_a_drawn_one_as_gradio_would_encode_it():
    stored = io.BytesIO()
    tile("green").save(stored, "JPEG")
    plain = ResultItem(3, 0.9, "plain", (80, 60), Image.open(io.BytesIO(stored.getvalue())), None, stored.getvalue())
    boxed = ResultItem(4, 0.8, "boxed", (80, 60), tile("red"), (1, 1, 5, 5))
    (path, caption), (drawn, _) = gallery_of(SearchResults([plain, boxed], (640, 480)))
    assert Path(path).read_bytes() == stored.getvalue() and path.endswith(".jpg")  # the bytes as stored
    assert caption == "plain · 0.900"
    # The same bytes Gradio's gallery would have written for the picture (format="jpeg"), in the same cache.
    assert Path(drawn).read_bytes() == processing_utils.encode_pil_to_bytes(boxed.picture, "jpeg")
    for file in (path, drawn):
        assert Path(file).is_relative_to(gr_utils.get_upload_folder())  # in Gradio's cache: served, cleaned with it


def test_webcam_data_url_reaches_the_engine_as_bytes(engine):
    data = io.BytesIO()
    tile("white").save(data, "PNG")
    url = "data:image/png;base64," + base64.b64encode(data.getvalue()).decode()
    Handlers(engine).search_image({"url": url}, 2, progress=quiet)
    assert engine.calls[0][1] == data.getvalue()


def test_engine_progress_reaches_gradios_progress_bar(engine, uploaded):
    shown = []
    Handlers(engine).search_image(uploaded, 2, progress=lambda fraction, desc: shown.append((fraction, desc)))
    assert shown == [(0.5, "search_image halfway")]


@pytest.mark.parametrize("k", ["many", None, [3]])
def test_a_number_of_results_that_is_not_a_whole_number_is_refused_before_the_engine_runs(engine, uploaded, k):
    with pytest.raises(gr.Error, match="number of results must be a whole number"):
        Handlers(engine).search_image(uploaded, k, progress=quiet)
    assert engine.calls == []


def test_a_user_error_from_the_engine_becomes_a_gradio_error_with_the_same_message(uploaded):
    engine = FakeEngine(fail=UserError("This image shows a person's face; try another photo."))
    with pytest.raises(gr.Error) as raised:
        Handlers(engine).search_image(uploaded, 2, progress=quiet)
    assert raised.value.message == "This image shows a person's face; try another photo."
    assert not isinstance(raised.value, UserError) and raised.value.print_exception is False


def test_other_errors_are_not_dressed_up_as_messages_for_the_user(uploaded):
    with pytest.raises(RuntimeError, match="bug"):
        Handlers(FakeEngine(fail=RuntimeError("bug"))).search_image(uploaded, 2, progress=quiet)


# --- "search from this result" -------------------------------------------------------------------

def test_clicking_a_result_searches_from_that_image_and_makes_it_the_query(engine):
    query, gallery, result_json, ids = Handlers(engine).search_from_result([5, 9, 2], 4, select(1), progress=quiet)
    assert engine.calls == [("search_similar", 9, 4), ("result_image", 9)]
    assert query.getpixel((0, 0)) == (0, 128, 0)  # the clicked image's own picture becomes the query
    assert ids == [9, 1] and result_json == search_results([9, 1]).to_json() and len(gallery) == 2


@pytest.mark.parametrize("ids, index", [([5, 9, 2], 3), ([5, 9, 2], -1), ([], 0), (None, 0), ([5, 9], (0, 1))])
def test_clicking_a_result_no_longer_shown_is_refused(engine, ids, index):
    with pytest.raises(gr.Error, match="no longer shown"):
        Handlers(engine).search_from_result(ids, 4, select(index), progress=quiet)
    assert engine.calls == []


# --- region retrieval ----------------------------------------------------------------------------

def test_region_from_numbers_passes_the_box_k_and_heat(engine, uploaded):
    gallery, result_json = Handlers(engine).search_region(uploaded, 10, 20.5, 110, 120, 3.0, 1, progress=quiet)
    assert engine.calls == [("search_region", uploaded, (10, 20.5, 110, 120), 3, True)]
    assert engine.calls[0][4] is True and len(gallery) == 1 and result_json == search_results([2]).to_json()


@pytest.mark.parametrize("corners", [(10, None, None, None), (10, 20, 110, None), (None, 20, 110, 120)])
def test_a_box_needs_all_four_corners_or_none(engine, uploaded, corners):
    with pytest.raises(gr.Error, match="all four box corners"):
        Handlers(engine).search_region(uploaded, *corners, 3, False, progress=quiet)
    with pytest.raises(gr.Error, match="all four box corners"):
        Handlers(engine).match_patches(uploaded, uploaded, *corners, 5, progress=quiet)
    assert engine.calls == []


def test_a_drawn_box_is_in_the_images_own_pixels_however_the_annotator_showed_it(engine, uploaded):
    # The annotator showed the image at half size: it sends canvas pixels and the factor.
    drawn = {"xmin": 100, "ymin": 50.2, "xmax": 200.4, "ymax": 150, "scaleFactor": 0.5,
             "label": "", "color": "rgb(0, 0, 0)"}
    Handlers(engine).search_region_drawn(annotated(uploaded, drawn), 3, False, progress=quiet)
    assert engine.calls == [("search_region", uploaded, (200, 100, 401, 300), 3, False)]
    library = image_annotator().preprocess_boxes([drawn])[0]  # what the component itself would compute
    assert engine.calls[0][2] == tuple(library[c] for c in ("xmin", "ymin", "xmax", "ymax"))


def test_the_last_box_drawn_counts_and_no_scale_factor_means_the_images_pixels(engine, uploaded):
    old, new = {"xmin": 1, "ymin": 1, "xmax": 5, "ymax": 5}, {"xmin": 30, "ymin": 40, "xmax": 90, "ymax": 80}
    Handlers(engine).search_region_drawn(annotated(uploaded, old, new), 3, True, progress=quiet)
    assert engine.calls[0][2] == (30, 40, 90, 80)


def test_no_box_drawn_reaches_the_engine_as_none(engine, uploaded):
    Handlers(engine).search_region_drawn(annotated(uploaded), 3, False, progress=quiet)
    assert engine.calls == [("search_region", uploaded, None, 3, False)]  # the engine says to draw one


def test_a_box_on_a_rotated_image_is_refused(engine, uploaded):
    value = {**annotated(uploaded, {"xmin": 1, "ymin": 1, "xmax": 5, "ymax": 5}), "orientation": 1}
    with pytest.raises(gr.Error, match="rotate the image back"):
        Handlers(engine).search_region_drawn(value, 3, False, progress=quiet)
    assert engine.calls == []


# --- patch matching ------------------------------------------------------------------------------

def test_match_patches_passes_both_images_the_box_and_an_int_n_and_shows_the_result(engine, uploaded):
    picture, summary, result_json = Handlers(engine).match_patches(uploaded, {"path": uploaded}, None, None, None,
                                                                   None, 7.0, progress=quiet)
    assert engine.calls == [("match", uploaded, uploaded, None, 7)] and type(engine.calls[0][4]) is int
    assert isinstance(picture, Image.Image)
    assert summary == match_result().summary and result_json == match_result().to_json()


def test_match_with_a_box_drawn_on_a(engine, uploaded):
    drawn = {"xmin": 10, "ymin": 10, "xmax": 60, "ymax": 40, "scaleFactor": 2}
    Handlers(engine).match_patches_drawn(annotated(uploaded, drawn), uploaded, 40, progress=quiet)
    assert engine.calls == [("match", uploaded, uploaded, (5, 5, 30, 20), 40)]


def test_a_number_of_lines_that_is_not_a_whole_number_is_refused(engine, uploaded):
    with pytest.raises(gr.Error, match="number of lines must be a whole number"):
        Handlers(engine).match_patches_drawn(annotated(uploaded), uploaded, "lots", progress=quiet)
    assert engine.calls == []


# --- only uploads are read -----------------------------------------------------------------------

def test_a_file_outside_gradios_upload_folder_is_refused_unread(engine, tmp_path, upload_dir):
    private = tmp_path / "private.jpg"
    tile("white").save(private)
    for path in (str(private), "/etc/passwd", str(upload_dir / ".." / ".." / "etc" / "passwd")):
        with pytest.raises(gr.Error, match="only reads files uploaded to it"):
            uploaded_file(path)
        with pytest.raises(gr.Error, match="only reads files uploaded to it"):
            Handlers(engine).search_image({"path": path, "meta": FILE_META}, 2, progress=quiet)
    assert engine.calls == []


def test_an_upload_already_deleted_asks_for_it_again(upload_dir):
    with pytest.raises(gr.Error, match="no longer on the server"):
        uploaded_file(str(upload_dir / "gone.jpg"))


def test_an_uploaded_file_is_passed_on_by_its_resolved_path(upload_dir, uploaded):
    assert uploaded_file(str(upload_dir / "." / "query.jpg")) == uploaded


# --- the page ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo() -> gr.Blocks:
    return build_ui(FakeEngine(), Settings(model="facebook/dinov2-small"))


def test_the_page_exposes_exactly_the_six_named_endpoints_with_their_inputs_in_order(demo):
    endpoints = demo.get_api_info()["named_endpoints"]
    assert set(endpoints) == {f"/{name}" for name in PUBLIC}
    names = {endpoint: [p["parameter_name"] for p in info["parameters"]] for endpoint, info in endpoints.items()}
    assert names == {"/search_image": ["image", "k"],
                     "/search_region": ["image", "x0", "y0", "x1", "y1", "k", "heat"],
                     "/match_patches": ["image_a", "image_b", "x0", "y0", "x1", "y1", "n"],
                     "/co_segment": ["image_a", "image_b"],
                     "/what_dino_sees": ["image", "share"],
                     "/what_dino_sees_video": ["video", "share"]}
    # The components in the inputs' order: what a positional gradio_client call fills.
    labels = {endpoint: [p["label"] for p in info["parameters"]] for endpoint, info in endpoints.items()
              if endpoint in ("/search_image", "/search_region", "/match_patches")}
    assert labels == {"/search_image": ["Query image: upload, paste or take a photo", "Number of results"],
                      "/search_region": ["image", "x0", "y0", "x1", "y1", "Number of results",
                                         "Show where each result is similar (heat map)"],
                      "/match_patches": ["image_a", "image_b", "x0", "y0", "x1", "y1",
                                         "Lines to draw (strongest first)"]}
    outputs = {endpoint: [r["label"] for r in info["returns"]] for endpoint, info in endpoints.items()
               if endpoint in ("/search_image", "/search_region", "/match_patches")}
    assert outputs == {"/search_image": ["Most similar images (click one to search with it)", "Results"],
                       "/search_region": ["Images holding a similar region (boxed)", "Results with boxes"],
                       "/match_patches": ["Matching patches (red: strongest, blue: weakest)", "Summary",
                                          "Matched point pairs (x, y in each image's pixels)"]}


def test_every_engine_event_gets_raw_payloads_in_the_shared_concurrency_group_and_ui_events_stay_private(demo):
    events = {fn.name: fn for fn in demo.fns.values() if fn.name not in ("load_example", "intro_on_page")}
    on_page = {"search_image_on_page", "search_from_result_on_page", "search_region_drawn_on_page",
               "match_patches_drawn_on_page", "co_segment_drawn_on_page", "what_dino_sees_on_page",
               "what_dino_sees_video_on_page"}
    assert set(events) == PUBLIC | on_page
    for name, fn in events.items():
        assert fn.preprocess is False and fn.concurrency_id == "engine", name
        assert (fn.api_name, fn.api_visibility) == ((name, "public") if name in PUBLIC else (name, "private")), name
        assert fn.tracks_progress, name
    assert events["search_from_result_on_page"].collects_event_data


def test_each_page_load_shows_the_number_of_images_the_index_holds_now(demo):
    load = next(fn for fn in demo.fns.values() if fn.name == "intro_on_page")
    assert load.api_visibility == "private" and not load.queue
    engine = load.fn.__self__.engine
    engine.index.count = 5  # images added while the app runs
    assert "**5 indexed images**" in load.fn()
    engine.index.count = 3


def test_the_intro_names_the_model_and_the_match_slider_starts_at_the_engines_default(demo):
    components = demo.get_config_file()["components"]
    intro = next(c for c in components if c["props"].get("elem_id") == "intro")
    assert f"`{short_name('facebook/dinov2-small')}` features" in intro["props"]["value"]
    assert "**3 indexed images**" in intro["props"]["value"]
    lines = next(c for c in components if c["props"].get("label") == "Lines to draw (strongest first)")
    assert lines["props"]["value"] == MATCH_LINES


def test_every_example_is_a_bundled_photo():
    names = [*EXAMPLE_QUERIES, *(f for f, _ in EXAMPLE_REGIONS), *(f for pair in EXAMPLE_PAIRS for f in pair)]
    assert all((BUNDLED_COLLECTION / name).is_file() for name in names)


def test_a_refusal_on_the_page_is_shown_in_the_results_area_until_the_next_search(engine, uploaded):
    from dino_demo.ui import shown_in_place

    handlers = Handlers(engine)
    on_page = shown_in_place(handlers.search_image, ([], None, []))
    engine.fail = UserError("This image shows a person's face (1 found).")
    gallery, result_json, ids, notice = on_page(uploaded, 3, progress=quiet)
    assert (gallery, result_json, ids) == ([], None, [])  # the last results do not linger under the message
    assert notice["visible"] is True and "This image shows a person's face" in notice["value"]
    engine.fail = None
    *shown, notice = on_page(uploaded, 3, progress=quiet)
    assert shown[0] and notice["visible"] is False  # the next search clears it
    with pytest.raises(gr.Error, match="person's face"):  # the API's event still raises, as clients expect
        engine.fail = UserError("This image shows a person's face (1 found).")
        handlers.search_image(uploaded, 3, progress=quiet)


# --- what DINO sees ------------------------------------------------------------------------------

def test_what_dino_sees_passes_the_upload_and_a_number_share_and_returns_three_pictures(engine, uploaded):
    maps, mask, colours, result = Handlers(engine).what_dino_sees({"path": uploaded, "meta": FILE_META}, "75",
                                                                  progress=quiet)
    assert engine.calls == [("what_dino_sees", uploaded, 75.0)]
    assert [p.getpixel((0, 0)) for p in (maps, mask, colours)] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert result == {"share": 75.0}
    with pytest.raises(gr.Error, match="must be a number from 1 to 100"):
        Handlers(engine).what_dino_sees(uploaded, "most", progress=quiet)


def test_a_clip_goes_to_the_engine_with_a_folder_for_the_video_in_gradios_upload_folder(engine, upload_dir):
    from gradio import utils as gr_utils

    clip = upload_dir / "clip.mp4"
    clip.write_bytes(b"pretend")
    video, result = Handlers(engine).what_dino_sees_video({"path": str(clip), "meta": FILE_META}, 60, progress=quiet)
    (name, source, share, folder), = engine.calls
    assert (name, source, share) == ("what_dino_sees_video", str(clip.resolve()), 60.0)
    assert Path(folder).is_relative_to(Path(gr_utils.get_upload_folder())) and video == str(Path(folder) / "result.mp4")
    with pytest.raises(gr.Error, match="Upload a short clip first"):
        Handlers(engine).what_dino_sees_video(None, 60, progress=quiet)


def test_a_clip_refused_for_a_face_is_deleted_and_one_refused_otherwise_is_kept(engine, upload_dir):
    from dino_demo.faces import FaceCheck, FaceRefused

    clip = upload_dir / "clip.mp4"
    clip.write_bytes(b"pretend")
    engine.fail = UserError("The clip is 12.0 s long; the limit is 10 s.")
    with pytest.raises(gr.Error, match="limit is 10 s"):
        Handlers(engine).what_dino_sees_video(str(clip), 60, progress=quiet)
    assert clip.exists()
    engine.fail = FaceRefused(FaceCheck(True, [(0, 0, 5, 5)], [0.9]), "Frame 3 of the clip (at 0.2 s)", "clip")
    with pytest.raises(gr.Error, match="Frame 3 of the clip"):
        Handlers(engine).what_dino_sees_video(str(clip), 60, progress=quiet)
    assert not clip.exists()  # nothing of a clip showing a person is kept


def test_old_result_videos_are_deleted_when_a_new_one_is_made(engine, upload_dir):
    import os
    import time

    handlers = Handlers(engine, upload_lifetime=60)
    folder = handlers.clip_folder()
    folder.mkdir(parents=True, exist_ok=True)
    old, new = folder / "what-dino-sees-old.mp4", folder / "what-dino-sees-new.mp4"
    old.write_bytes(b"x"), new.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    handlers.clip_folder()
    assert not old.exists() and new.exists()
    new.unlink()


def test_the_tab_names_the_model_and_its_registers(demo):
    components = demo.get_config_file()["components"]
    note = next(c for c in components if c["props"].get("elem_id") == "sees-model")
    assert "dinov2-small (DINOv2 without registers" in note["props"]["value"]
