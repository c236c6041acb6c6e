"""Uploads prepared early: the load, face gate and embedding begun as a file lands, taken by its request."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import face_photo_path, make_image
from test_engine import CountingEmbedder, indexed, no_faces  # noqa: F401  (indexed is a fixture)

from dino_demo.engine import Engine
from dino_demo.faces import FaceGate, FaceRefused
from dino_demo.images import ImageError
from dino_demo.uploads import Uploads

ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition, what: str, seconds: float = 30.0) -> None:
    """Waits for work begun in the background; a test fails only if it never happens."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def counting_engine(indexed, gate=None) -> Engine:
    _, embedder, index = indexed
    return Engine(CountingEmbedder(embedder), index, gate or FaceGate(detector=no_faces), 40_000_000, 25_000_000)


def copied(source: Path, folder: Path, name: str | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(source, folder / (name or source.name)))


def test_a_prepared_upload_is_searched_without_embedding_it_again(indexed, tmp_path):
    folder = indexed[0]
    path = copied(folder / "img005.jpg", tmp_path)
    engine = counting_engine(indexed)
    assert engine.prepare_upload(path)
    wait_for(lambda: engine.embedder.embedded == 1, "the upload embedded in the background")

    prepared = engine.search_image(path, k=3)
    again = engine.search_region(path, (10, 5, 60, 50), k=3)  # the same file, a box drawn later
    assert engine.embedder.embedded == 1  # neither request embedded the image itself
    plain = counting_engine(indexed)
    expected, expected_region = plain.search_image(path, k=3), plain.search_region(path, (10, 5, 60, 50), k=3)
    assert plain.embedder.embedded == 2
    for got, want in ((prepared, expected), (again, expected_region)):
        assert [i.id for i in got.items] == [i.id for i in want.items]
        assert [i.score for i in got.items] == pytest.approx([i.score for i in want.items], abs=1e-5)
        assert [i.box for i in got.items] == [i.box for i in want.items]
    assert prepared.items[0].label == "picture 5"


def test_a_match_of_two_prepared_uploads_embeds_neither_again(indexed, tmp_path):
    folder = indexed[0]
    a, b = copied(folder / "img002.jpg", tmp_path), copied(folder / "img007.jpg", tmp_path)
    engine = counting_engine(indexed)
    assert engine.prepare_upload(a) and engine.prepare_upload(b)
    wait_for(lambda: engine.embedder.embedded == 2, "both uploads embedded in the background")
    got = engine.match(a, b, n=5).to_json()
    assert engine.embedder.embedded == 2
    want = counting_engine(indexed).match(a, b, n=5).to_json()
    assert got["count"] == want["count"] and got["mean_score"] == pytest.approx(want["mean_score"], abs=1e-4)
    assert [p["a"] for p in got["pairs"]] == [p["a"] for p in want["pairs"]]


def test_a_face_found_early_refuses_its_request_in_the_same_words_and_is_never_embedded(indexed, tmp_path):
    face = copied(Path(face_photo_path()), tmp_path)
    engine = counting_engine(indexed, FaceGate())  # the real MediaPipe gate
    with pytest.raises(FaceRefused) as inline:
        engine.search_image(face, k=3)
    assert engine.prepare_upload(copied(Path(face), tmp_path, "again.jpg"))
    with pytest.raises(FaceRefused) as early:
        engine.search_image(str(tmp_path / "again.jpg"), k=3)
    assert str(early.value) == str(inline.value)
    assert engine.embedder.embedded == 0


class Recorder:
    """A stand-in for the engine's work: records each path, and waits on `hold` while it is set up."""

    def __init__(self):
        self.done: list[str] = []
        self.hold: threading.Event | None = None
        self.started = threading.Event()

    def __call__(self, path: str):
        self.started.set()
        if self.hold is not None:
            self.hold.wait(30)
        self.done.append(path)
        return f"prepared {Path(path).name}"


@pytest.fixture
def photos(tmp_path) -> list[str]:
    paths = []
    for i in range(4):
        make_image(i, (80, 60)).save(tmp_path / f"p{i}.jpg")
        paths.append(str(tmp_path / f"p{i}.jpg"))
    return paths


def test_nothing_begins_while_a_request_is_served(photos):
    work = Recorder()
    uploads = Uploads(work)
    with uploads.serving():
        assert not uploads.begin(photos[0])
    assert uploads.take(photos[0]) is None
    assert uploads.begin(photos[0]) and uploads.take(photos[0]) == "prepared p0.jpg"
    assert not uploads.begin(photos[0])  # begun already: its entry is kept for later requests
    assert uploads.take(photos[0]) == "prepared p0.jpg" and work.done == [photos[0]]


def test_a_request_does_work_not_yet_started_itself_and_waits_for_work_under_way(photos):
    work = Recorder()
    work.hold = threading.Event()
    uploads = Uploads(work)
    assert uploads.begin(photos[0]) and uploads.begin(photos[1])
    assert work.started.wait(30)  # p0 runs (held); p1 waits behind it in the one thread
    assert uploads.take(photos[1]) is None  # not started: dropped, the request does it
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(uploads.take(photos[0])))
    waiter.start()
    time.sleep(0.05)
    assert taken == []  # under way: the request waits for it rather than doing it twice
    work.hold.set()
    waiter.join(30)
    assert taken == ["prepared p0.jpg"] and work.done == [photos[0]]


def test_room_is_made_by_dropping_the_least_recently_used_entry_but_never_the_one_under_way(photos):
    work = Recorder()
    work.hold = threading.Event()
    uploads = Uploads(work, capacity=2)
    assert uploads.begin(photos[0]) and work.started.wait(30)  # p0 under way (held)
    assert uploads.begin(photos[1])  # p1 waits behind it
    assert uploads.begin(photos[2])  # full: p1, not started, is dropped and never starts; p0 is kept
    work.hold.set()
    assert uploads.take(photos[0]) == "prepared p0.jpg" and uploads.take(photos[1]) is None
    wait_for(lambda: work.done == [photos[0], photos[2]], "p2 prepared")
    assert uploads.take(photos[0]) is not None  # taken again: now the most recently used
    assert uploads.begin(photos[3])  # so p2 makes room
    wait_for(lambda: len(work.done) == 3, "p3 prepared")
    assert uploads.take(photos[2]) is None and uploads.take(photos[0]) == "prepared p0.jpg"
    assert work.done == [photos[0], photos[2], photos[3]]


def test_room_is_made_for_a_large_photo_by_dropping_as_many_as_its_pixels_need(photos, tmp_path):
    work = Recorder()
    uploads = Uploads(work, capacity=8, max_pixels=3 * 80 * 60)  # three photos' worth, or one twice as large
    large = tmp_path / "large.jpg"
    make_image(7, (120, 80)).save(large)  # twice a photo's pixels
    for photo in photos[:3]:
        assert uploads.begin(photo)
    wait_for(lambda: len(work.done) == 3, "three photos prepared")
    assert uploads.take(photos[0]) is not None  # p0 is now the most recently used
    assert uploads.begin(str(large))
    wait_for(lambda: len(work.done) == 4, "the large photo prepared")
    assert uploads.take(photos[1]) is None and uploads.take(photos[2]) is None  # dropped, least recent first
    assert uploads.take(photos[0]) is not None and uploads.take(str(large)) is not None


def test_a_changed_file_is_not_taken_for_the_old_one(photos):
    uploads = Uploads(Recorder())
    assert uploads.begin(photos[0])
    wait_for(lambda: uploads.take(photos[0]) is not None, "p0 prepared")
    make_image(9, (120, 90)).save(photos[0])
    assert uploads.take(photos[0]) is None


def test_clips_bad_files_and_huge_images_are_left_to_their_request(tmp_path, photos):
    work = Recorder()
    uploads = Uploads(work, max_pixels=80 * 60 - 1)
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(b"not an image\n" * 20)
    for path in (str(notes), photos[0], str(tmp_path / "gone.jpg")):
        uploads.begin(path)
        assert uploads.take(path) is None
    assert work.done == []


def test_what_the_work_raised_is_raised_to_the_request(photos):
    def refuse(path):
        raise ImageError("This file is not an image Pillow can read")

    uploads = Uploads(refuse)
    assert uploads.begin(photos[0])
    for _ in range(2):  # every request on the file hears it
        with pytest.raises(ImageError, match="not an image"):
            uploads.take(photos[0])


def test_the_app_prepares_what_a_client_uploads_before_its_request(app_server, monkeypatch):
    url, engine = app_server
    embedded = []
    real = engine.embedder.embed
    monkeypatch.setattr(engine.embedder, "embed", lambda images: embedded.append(len(images)) or real(images))
    photo = ROOT / "assets" / "collection" / "mate-red-marigold.jpg"
    with httpx.Client(base_url=url, timeout=60) as http:
        with open(photo, "rb") as f:
            path = http.post("gradio_api/upload", files={"files": (f"early-{time.time_ns()}.jpg", f)}).json()[0]
        wait_for(lambda: embedded == [1], "the uploaded photo embedded before its request")
        event = http.post("gradio_api/call/search_image",
                          json={"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, 3]}).json()["event_id"]
        answer = http.get(f"gradio_api/call/search_image/{event}").text
        assert answer.startswith("event: complete")
        best = json.loads(answer.split("data: ", 1)[1])[1]["results"][0]
        assert best["score"] == pytest.approx(1.0, abs=1e-4)  # the photo itself, from the bundled collection
        assert embedded == [1]  # the request took the prepared features
        notes = http.post("gradio_api/upload", files={"files": ("notes.txt", b"not an image")})
        assert notes.status_code == 200 and http.get("gradio_api/info").status_code == 200
