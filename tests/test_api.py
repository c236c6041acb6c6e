"""Every endpoint of the running app through gradio_client: results, refusals and clean errors."""
from __future__ import annotations

import pytest
from conftest import ROOT

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

COLLECTION = ROOT / "assets" / "collection"
LADYBIRD, MARIGOLD, YELLOW = (str(COLLECTION / f) for f in
                              ("mate-ladybird-on-grass.jpg", "mate-red-marigold.jpg", "mate-yellow-flower.jpg"))
FACE_MESSAGE = "This image shows a person's face"


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return Client(url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def face_photo() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def label_of(name: str) -> str:
    for line in (COLLECTION / "metadata.csv").read_text().splitlines():
        if line.startswith(name + ","):
            return line.split(",", 1)[1]
    raise KeyError(name)


def test_api_lists_the_six_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/search_image", "/search_region", "/match_patches", "/co_segment", "/what_dino_sees",
                     "/what_dino_sees_video"}


def test_search_image_finds_the_indexed_image_first(client):
    gallery, result = client.predict(handle_file(MARIGOLD), 4, api_name="/search_image")
    assert [r["label"] for r in result["results"]][0] == label_of("mate-red-marigold.jpg")
    assert result["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert len(result["results"]) == len(gallery) == 4
    assert gallery[0]["caption"].startswith(label_of("mate-red-marigold.jpg") + " · ")
    assert {"embed", "search", "draw", "total"} <= set(result["timings_ms"])


def test_search_region_returns_boxes_inside_each_hit(client):
    _, result = client.predict(handle_file(LADYBIRD), 322, 132, 398, 196, 5, True, api_name="/search_region")
    assert result["query"]["box"] == [322.0, 132.0, 398.0, 196.0]
    top = result["results"][0]
    assert top["label"] == label_of("mate-ladybird-on-grass.jpg")
    for hit in result["results"]:
        x0, y0, x1, y1 = hit["box"]
        assert 0 <= x0 < x1 <= hit["width"] and 0 <= y0 < y1 <= hit["height"]
    x0, y0, x1, y1 = top["box"]  # the ladybird finds itself where it is
    assert x0 <= 360 <= x1 and y0 <= 164 <= y1


def test_match_patches_returns_point_pairs(client):
    picture, summary, result = client.predict(handle_file(MARIGOLD), handle_file(YELLOW), None, None, None, None, 7,
                                              api_name="/match_patches")
    assert result["count"] > 0 and summary.startswith(f"{result['count']} matches, mean similarity ")
    assert len(result["pairs"]) == min(7, result["count"])
    scores = [p["score"] for p in result["pairs"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= p["a"][0] <= 512 and 0 <= p["b"][1] <= 512 for p in result["pairs"])
    assert picture  # a file path or URL of the drawn picture


def test_match_patches_with_a_box_keeps_matches_inside_it(client):
    _, _, result = client.predict(handle_file(MARIGOLD), handle_file(YELLOW), 180, 55, 512, 300, 50,
                                  api_name="/match_patches")
    assert result["box"] == [180.0, 55.0, 512.0, 300.0]
    assert all(180 <= p["a"][0] <= 512 and 55 <= p["a"][1] <= 300 for p in result["pairs"])


def test_what_dino_sees_returns_three_pictures_and_the_mask(client):
    maps, mask, colours, result = client.predict(handle_file(LADYBIRD), 60, api_name="/what_dino_sees")
    assert maps and mask and colours
    assert (result["width"], result["height"], result["share"], result["grid"]) == (512, 320, 60, [14, 14])
    assert 0 < result["mask"]["share"] <= 1 and result["mask"]["components"]
    for part in result["mask"]["components"]:
        assert part["rle"]["size"] == [320, 512] and sum(part["rle"]["counts"]) == 320 * 512
    assert result["model"].startswith("tiny-dino-vit (DINO")
    _, _, _, wider = client.predict(handle_file(LADYBIRD), 90, api_name="/what_dino_sees")
    assert wider["mask"]["share"] > result["mask"]["share"]  # more of the attention mass: more of the image


def test_what_dino_sees_video_returns_a_video_and_each_frame(client, tmp_path):
    from conftest import write_clip

    clip = write_clip(tmp_path / "pan.mp4", seconds=1, fps=24)
    video, result = client.predict(handle_file(str(clip)), 60, api_name="/what_dino_sees_video")
    assert video["path"].endswith(".mp4")
    assert len(result["frames"]) == 8 and result["frames"][-1]["time"] == pytest.approx(0.875, abs=0.01)
    assert result["seconds_per_frame"] > 0 and "face_gate" in result["timings_ms"]


def test_co_segment_returns_a_picture_and_both_masks(client):
    picture, result = client.predict(handle_file(MARIGOLD), handle_file(YELLOW), api_name="/co_segment")
    assert picture and len(result["images"]) == 2
    assert all(0 < image["mask"]["share"] < 1 for image in result["images"])


@pytest.mark.parametrize("turn", [0, 90, 180, 270])
@pytest.mark.parametrize("endpoint", ["/search_image", "/search_region", "/match_patches_a", "/match_patches_b",
                                      "/what_dino_sees", "/co_segment"])
def test_face_photo_is_refused_by_every_endpoint_and_the_server_keeps_serving(client, face_photo, endpoint, turn,
                                                                             tmp_path):
    from PIL import Image

    turned = tmp_path / f"face-{turn}.jpg"
    Image.open(face_photo).rotate(turn, expand=True).save(turned)  # pixels turned, no EXIF tag
    face, other = handle_file(str(turned)), handle_file(MARIGOLD)
    calls = {
        "/what_dino_sees": lambda: client.predict(face, 60, api_name="/what_dino_sees"),
        "/co_segment": lambda: client.predict(other, face, api_name="/co_segment"),
        "/search_image": lambda: client.predict(face, 3, api_name="/search_image"),
        "/search_region": lambda: client.predict(face, 10, 10, 200, 200, 3, False, api_name="/search_region"),
        "/match_patches_a": lambda: client.predict(face, other, None, None, None, None, 5, api_name="/match_patches"),
        "/match_patches_b": lambda: client.predict(other, face, None, None, None, None, 5, api_name="/match_patches"),
    }
    with pytest.raises(AppError, match=FACE_MESSAGE):
        calls[endpoint]()
    _, result = client.predict(handle_file(LADYBIRD), 2, api_name="/search_image")
    assert len(result["results"]) == 2


def test_non_image_bytes_give_a_clear_error(client, tmp_path):
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(junk)), 3, api_name="/search_image")


def test_zero_area_box_gives_a_clear_error(client):
    with pytest.raises(AppError, match="no area"):
        client.predict(handle_file(LADYBIRD), 100, 100, 100, 180, 3, False, api_name="/search_region")


def test_k_out_of_range_gives_a_clear_error(client):
    with pytest.raises(AppError, match="between 1 and"):
        client.predict(handle_file(LADYBIRD), 0, api_name="/search_image")


def test_half_given_box_gives_a_clear_error(client):
    with pytest.raises(AppError, match="all four box corners"):
        client.predict(handle_file(MARIGOLD), handle_file(YELLOW), 10, None, None, None, 5, api_name="/match_patches")


def test_app_startup_error_is_one_line_and_exit_code_2(tiny_vit, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", DINO_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(tiny_vit), "--device", "cpu",
                           "--index", str(tmp_path / "missing-index")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No index folder at" in lines[0]
    assert "Traceback" not in done.stderr


def test_app_settings_come_from_env_then_the_command_line():
    import importlib.util

    spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    env = {"DINO_MODEL": "env/model", "DINO_INDEX": "hf://a/b", "DINO_PORT": "9000", "DINO_K": "4"}
    settings = app.load_settings(["--port", "7000", "--allow-faces"], env)
    assert (settings.model, settings.index, settings.port, settings.k, settings.face_gate) == \
        ("env/model", "hf://a/b", 7000, 4, False)
    assert app.load_settings(["--index", "idx"], env).index == "idx"


def test_the_latency_benchmarks_plain_http_client_gets_what_gradio_client_gets(app_server, client, monkeypatch):
    """benchmarks/latency.py --think: the same answers as gradio_client, its waits counted apart."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from latency import ThinkingClient, served

    url, _ = app_server
    thinking = ThinkingClient(url, think=0.05)
    assert served(thinking) == served(client)
    got, want = (c.predict(handle_file(MARIGOLD), 3, api_name="/search_image") for c in (thinking, client))
    assert len(got[0]) == len(want[0]) == 3  # the gallery, then the JSON (raw HTTP adds the hidden state's None)
    assert {**got[1], "timings_ms": None} == {**want[1], "timings_ms": None}
    picture, summary, result = thinking.predict(handle_file(MARIGOLD), handle_file(YELLOW), None, None, None, None, 5,
                                                api_name="/match_patches")
    assert picture and summary.startswith(f"{result['count']} matches") and len(result["pairs"]) == 5
    assert thinking.waited == pytest.approx(0.1)


def test_a_result_picture_is_kept_by_the_browser_and_the_page_is_not(client, app_server):
    """ui.KeptFiles: a file served from a folder named by its bytes' hash never changes under its URL, so the
    browser keeps it (a thumbnail shown again costs no request); other answers are left as Gradio gives them."""
    import httpx

    url, _ = app_server
    gallery, _ = client.predict(handle_file(MARIGOLD), 4, api_name="/search_image")
    with httpx.Client(base_url=url) as http:
        picture = http.get(gallery[0]["image"]["url"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        assert picture.headers["cache-control"] == "private, max-age=3600, immutable"
        assert http.head(gallery[0]["image"]["url"]).headers["cache-control"].endswith("immutable")
        missing = http.get(gallery[0]["image"]["url"].rsplit("/", 1)[0] + "/no-such-picture.jpg")
        assert missing.status_code != 200 and "immutable" not in missing.headers.get("cache-control", "")
        for page in ("/", "/gradio_api/info"):
            assert "immutable" not in http.get(page).headers.get("cache-control", "")
