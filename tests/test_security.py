"""Security of the running app: the face gate on every input path, no server paths or URLs read,
uploads kept in a temp folder and deleted, no secrets in the logs."""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, make_image, write_clip

from gradio import utils as gr_utils

COLLECTION = ROOT / "assets" / "collection"
MARIGOLD = COLLECTION / "mate-red-marigold.jpg"
FACE_MESSAGE = "This image shows a person's face"
FACE_SEEN = "shows a person's face"  # a photo: "This image ...", a clip: "Frame N of the clip (at T s) ..."
FILE_META = {"_type": "gradio.FileData"}
CLIP = ROOT / "assets" / "clips" / "marigold-pan.mp4"
IMAGE_SLOTS = {  # endpoint -> (arguments with the image (or clip) slots as None, positions of those slots)
    "search_image": ([None, 3], [0]),
    "search_region": ([None, 10, 10, 200, 200, 3, False], [0]),
    "match_patches": ([None, None, None, None, None, None, 5], [0, 1]),
    "co_segment": ([None, None], [0, 1]),
    "what_dino_sees": ([None, 60], [0]),
    "what_dino_sees_video": ([None, 60], [0]),
}


@pytest.fixture(scope="module")
def face_photo() -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def call(url: str, endpoint: str, data: list) -> str:
    """One raw HTTP call of an endpoint (no gradio_client, which would upload a path for us): the SSE reply."""
    api = f"{url}gradio_api/call/{endpoint}"
    event = httpx.post(api, json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{api}/{event}", timeout=120).text


def with_image(endpoint: str, payload, other) -> list[list]:
    """The endpoint's arguments with `payload` in each image slot in turn (the other slot holds `other`)."""
    template, slots = IMAGE_SLOTS[endpoint]
    calls = []
    for slot in slots:
        data = list(template)
        for s in slots:
            data[s] = payload if s == slot else other
        calls.append(data)
    return calls


@pytest.mark.parametrize("turn", [0, 90])
def test_the_face_gate_guards_every_ui_event_that_takes_an_image(app_server, face_photo, upload_dir, turn):
    from PIL import Image

    from dino_demo.config import Settings
    from dino_demo.ui import build_ui

    _, engine = app_server
    demo = build_ui(engine, Settings(model=str(engine.embedder.model_id), input_size=224))
    face = str(upload_dir / "face.jpg")
    Image.open(face_photo).rotate(turn, expand=True).save(face)  # a photo on its side too
    clean = str(shutil.copy(MARIGOLD, upload_dir / "clean.jpg"))
    image, boxed = {"path": face, "meta": FILE_META}, {"image": {"path": face}, "boxes": [
        {"xmin": 10, "ymin": 10, "xmax": 200, "ymax": 200}]}
    other, other_boxed = {"path": clean, "meta": FILE_META}, {"image": {"path": clean}, "boxes": []}
    def clip():  # a fresh copy each time: a refused clip is deleted
        path = write_clip(upload_dir / f"face-{uuid.uuid4().hex[:8]}.mp4", seconds=0.5, fps=8, face_at=2)
        return {"path": str(path), "meta": FILE_META}

    calls = {  # every event of the app with an image input, with the face in each image in turn
        "search_image": [(image, 3)],
        "search_image_on_page": [(image, 3)],
        "search_region": [(image, 10, 10, 200, 200, 3, False)],
        "search_region_drawn_on_page": [(boxed, 3, False)],
        "match_patches": [(image, other, None, None, None, None, 5), (other, image, None, None, None, None, 5)],
        "match_patches_drawn_on_page": [(boxed, other, 5), (other_boxed, image, 5)],
        "co_segment": [(image, other), (other, image)],
        "co_segment_drawn_on_page": [(boxed, other), (other_boxed, image)],
        "what_dino_sees": [(image, 60)],
        "what_dino_sees_on_page": [(image, 60)],
        "what_dino_sees_video": [(clip(), 60)],
        "what_dino_sees_video_on_page": [(clip(), 60)],
    }
    takes_image = {fn.name for fn in demo.fns.values()
                   if any(type(b).__name__ in ("Image", "image_annotator", "Video") for b in fn.inputs) and fn.fn}
    assert takes_image == set(calls), "an event takes an image or a clip but is not checked here"
    by_name = {fn.name: fn.fn for fn in demo.fns.values()}
    quiet = lambda *a, **k: None  # noqa: E731  (no progress bar outside a request)
    for name, argument_lists in calls.items():
        for args in argument_lists:
            if name.endswith("_on_page"):  # the page shows the refusal in its results area
                notice = by_name[name](*args, progress=quiet)[-1]
                assert notice["visible"] and FACE_SEEN in notice["value"], name
                continue
            with pytest.raises(Exception, match=FACE_SEEN):
                by_name[name](*args, progress=quiet)


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        self.wfile.write(MARIGOLD.read_bytes())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def internal_url():
    """An internal address serving a real JPEG, recording every request it gets."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/photo.jpg"
    server.shutdown()


def server_paths(image: Path, url: str) -> list:
    """Ways a client might name a file or an address instead of uploading an image."""
    return [str(image), {"path": str(image)}, {"path": str(image), "meta": FILE_META}, f"file://{image}",
            {"path": f"file://{image}", "meta": FILE_META}, {"path": "/etc/passwd"}, "/etc/passwd",
            {"path": "/etc/passwd", "meta": FILE_META}, {"path": "../../../../etc/passwd"},
            url, {"path": url, "meta": FILE_META}, {"url": url, "meta": FILE_META},
            {"path": "http://169.254.169.254/latest/meta-data/", "meta": FILE_META}]


@pytest.mark.parametrize("endpoint", sorted(IMAGE_SLOTS))
def test_no_endpoint_reads_a_server_path_or_fetches_an_internal_url(app_server, tmp_path, upload_dir, internal_url,
                                                                    endpoint):
    url, _ = app_server
    real = CLIP if endpoint.endswith("video") else MARIGOLD
    image = Path(shutil.copy(real, tmp_path / f"private{real.suffix}"))  # a real file on the server, not uploaded
    uploaded = {"path": str(shutil.copy(real, upload_dir / f"uploaded{real.suffix}")), "meta": FILE_META}
    assert "event: complete" in call(url, endpoint, with_image(endpoint, uploaded, uploaded)[0])
    _Recorder.hits.clear()
    for payload in server_paths(image, internal_url):
        for data in with_image(endpoint, payload, uploaded):
            reply = call(url, endpoint, data)
            assert "event: error" in reply and "event: complete" not in reply, (payload, reply)
    assert _Recorder.hits == []  # the internal address was never fetched
    reply = call(url, endpoint, with_image(endpoint, {"path": str(image)}, uploaded)[0])
    assert "event: error" in reply and "event: complete" not in reply
    if not endpoint.endswith("video"):  # a Video input's payload is checked by Gradio itself, before the handler
        assert "only reads files uploaded to it" in reply


def test_uploads_live_in_the_temp_folder_and_are_deleted_after_their_lifetime(app_server, tmp_path):
    from gradio_client import Client, handle_file

    from dino_demo.config import Settings
    from dino_demo.ui import build_ui, launch_options

    _, engine = app_server
    settings = Settings(model=str(engine.embedder.model_id), input_size=224, port=free_port(), host="127.0.0.1",
                        upload_lifetime=2)
    photo = tmp_path / "photo.jpg"  # new bytes: Gradio names cached files by content, examples are kept
    make_image(int(time.time()), (120, 90)).save(photo)
    demo = build_ui(engine, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings, engine))
    try:
        base = f"http://127.0.0.1:{settings.port}/"
        with open(photo, "rb") as f:
            uploaded = Path(httpx.post(f"{base}gradio_api/upload", files={"files": f}, timeout=60).json()[0])
        assert uploaded.is_file() and uploaded.is_relative_to(Path(gr_utils.get_upload_folder()).resolve())
        client = Client(base, verbose=False, download_files=False)
        gallery, _ = client.predict(handle_file(str(photo)), 2, api_name="/search_image")
        result_picture = Path(gallery[0]["image"]["path"])
        assert result_picture.is_file()
        deadline = time.time() + 60
        while (uploaded.exists() or result_picture.exists()) and time.time() < deadline:
            time.sleep(0.5)
        assert not uploaded.exists() and not result_picture.exists()
        reply = call(base, "search_image", [{"path": str(uploaded), "meta": FILE_META}, 2])
        assert "event: error" in reply  # an expired upload is refused, the server carries on
        _, result = client.predict(handle_file(str(MARIGOLD)), 2, api_name="/search_image")
        assert len(result["results"]) == 2
    finally:
        demo.close()


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError("the app did not start")


def test_no_secret_reaches_the_logs(app_server, tmp_path, face_photo):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    _, engine = app_server
    secret = "hf_dinodemoTESTsecret0123456789"
    port = free_port()
    env = dict(os.environ, HF_TOKEN=secret, HUGGING_FACE_HUB_TOKEN=secret, HF_HUB_OFFLINE="1", DINO_PORT=str(port),
               DINO_HOST="127.0.0.1")
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(engine.embedder.model_id),
                                    "--index", str(engine.index.path), "--input-size", "224", "--device", "cpu"],
                                   cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        wait_for_port(port, process)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        assert client.predict(handle_file(str(MARIGOLD)), 2, api_name="/search_image")[1]["results"]
        junk = tmp_path / "junk.jpg"
        junk.write_bytes(b"<html>not an image</html>")
        for bad in (junk, face_photo):
            with pytest.raises(AppError):
                client.predict(handle_file(str(bad)), 2, api_name="/search_image")
        call(f"http://127.0.0.1:{port}/", "search_image", [{"path": "/etc/passwd"}, 2])
    finally:
        process.terminate()
        process.wait(timeout=60)
    text = log.read_text()
    assert "DINO image search at" in text  # the log was captured (the start line)
    assert secret not in text and secret[3:] not in text
    missing = subprocess.run([sys.executable, str(ROOT / "app.py"), "--index", "hf://me/private-index",
                              "--model", str(engine.embedder.model_id), "--device", "cpu"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert missing.returncode == 2 and "private-index" in missing.stderr
    assert secret not in missing.stdout + missing.stderr
