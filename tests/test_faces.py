"""Tests for dino_demo.faces: real MediaPipe on a real portrait and generated images, fakes elsewhere."""
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image, ImageDraw

from dino_demo.faces import UPRIGHT, FaceCheck, FaceGate, FaceRefused, NoFaceGate, gate_view, work_size
from dino_demo.geometry import Box

COLLECTION = Path(__file__).resolve().parents[1] / "assets" / "collection"
GRACE_FACE = (171, 146, 366, 342)  # where the face is in grace_hopper.jpg (512 x 600), checked by eye


@pytest.fixture(scope="module")
def gate():
    gate = FaceGate()
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def centre_inside(box, outer) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]


def test_portrait_is_refused_with_a_box_on_the_face(gate, portrait):
    check = gate.check(portrait)
    assert check.has_face and len(check.boxes) == len(check.scores) == 1
    x0, y0, x1, y1 = check.boxes[0]
    assert 0 <= x0 < x1 <= portrait.width and 0 <= y0 < y1 <= portrait.height
    assert 120 <= x1 - x0 <= 280 and 120 <= y1 - y0 <= 280  # the face is ~195 px wide
    assert centre_inside(check.boxes[0], GRACE_FACE) and centre_inside(GRACE_FACE, check.boxes[0])
    assert 0.5 <= check.scores[0] <= 1.0


def test_close_up_filled_by_the_face_is_refused(gate, portrait):
    # The full-range model misses a face filling 90% of the frame; the short-range one finds it.
    close_up = portrait.crop((160, 136, 377, 353))
    check = gate.check(close_up)
    assert len(check.boxes) == 1
    x0, y0, x1, y1 = check.boxes[0]
    assert x1 - x0 > 0.7 * close_up.width and y1 - y0 > 0.7 * close_up.height


@pytest.mark.parametrize("background", ["plain", "noise"])
@pytest.mark.parametrize("where", [(0, 0), (700, 520), (1450, 1030)])  # corner, across tile seams, far corner
def test_small_face_in_a_large_image_is_found(gate, portrait, background, where):
    # At 25% the face is ~49 px, 3% of the long side: only the tiles can see it.
    small = portrait.resize((128, 150), Image.LANCZOS)
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    canvas = Image.new("RGB", (1600, 1200), (128, 128, 128)) if background == "plain" else Image.fromarray(noise)
    canvas.paste(small, where)
    check = gate.check(canvas)
    assert len(check.boxes) == 1
    face = tuple(v / 4 + where[i % 2] for i, v in enumerate(GRACE_FACE))
    assert centre_inside(check.boxes[0], face)


def test_a_small_face_in_a_phone_sized_photo_is_found(gate, portrait):
    # 4032 x 3024 is checked at 2016 x 1512 (blocks of 2 x 2 averaged): the face, ~97 px here, is ~49 there.
    canvas = Image.new("RGB", (4032, 3024), (128, 128, 128))
    canvas.paste(portrait.resize((256, 300), Image.LANCZOS), (1400, 1040))  # across tile seams
    check = gate.check(canvas)
    assert len(check.boxes) == 1
    assert centre_inside(check.boxes[0], tuple(v / 2 + (1400, 1040)[i % 2] for i, v in enumerate(GRACE_FACE)))


@pytest.mark.parametrize("size, work", [
    ((512, 600), ((512, 600), 1)), ((2048, 1536), ((2048, 1536), 1)),  # small enough already
    ((4032, 3024), ((2016, 1512), 2)), ((3024, 4032), ((1512, 2016), 2)), ((5712, 4284), ((1904, 1428), 3)),
    ((8064, 6048), ((2016, 1512), 4)), ((4033, 3025), ((2017, 1513), 2)),  # phones; a whole factor
    ((3000, 2000), ((2048, 1365), 1)), ((5000, 3000), ((2048, 1229), 1)),  # a whole factor would land too small
])
def test_phone_photos_are_shrunk_by_a_whole_factor_where_it_lands_near_the_largest_side(size, work):
    assert work_size(size) == work


def test_gate_view_averages_blocks_of_a_phone_photo_resamples_others_and_copies_nothing_it_need_not():
    rng = np.random.default_rng(0)
    phone = Image.fromarray(rng.integers(0, 256, (3025, 4033, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(gate_view(phone)), np.asarray(phone.reduce(2)))
    camera = Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(gate_view(camera)), np.asarray(camera.resize((2048, 1365), Image.BILINEAR)))
    small = Image.fromarray(rng.integers(0, 256, (600, 512, 3), dtype=np.uint8))
    assert gate_view(small) is small
    assert gate_view(small.convert("L")).mode == "RGB"


def make_face_free_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 255, 640, dtype=np.uint8)
    gradient = np.stack([np.tile(ramp, (480, 1)), np.tile(ramp[::-1], (480, 1)), np.full((480, 640), 90, np.uint8)], -1)
    shapes = Image.new("RGB", (800, 600), "white")
    draw = ImageDraw.Draw(shapes)
    for _ in range(40):
        x, y, r = rng.integers(0, 800), rng.integers(0, 600), rng.integers(10, 80)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
        "large noise": Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)),
        "gradient": Image.fromarray(gradient),
        "shapes": shapes,
        "grey": Image.new("L", (300, 200), 128),
        "tiny": Image.new("RGB", (3, 3), "red"),
    }


@pytest.mark.parametrize("name", list(make_face_free_images()))
def test_face_free_generated_images_pass(gate, name):
    image = make_face_free_images()[name]
    assert gate.check(image) == FaceCheck(False, [], [])
    gate.require_no_face(image)


@pytest.mark.skipif(not COLLECTION.is_dir(), reason="no assets/collection")
def test_the_shipped_collection_passes(gate):
    refused = []
    for path in sorted(COLLECTION.glob("*.jpg")):
        with Image.open(path) as image:
            if gate.check(image).has_face:
                refused.append(path.name)
    assert refused == []


def test_require_no_face_raises_face_refused_with_a_clear_message(gate, portrait):
    from dino_demo.errors import UserError

    with pytest.raises(FaceRefused) as raised:
        gate.require_no_face(portrait)
    assert isinstance(raised.value, UserError)  # shown to the person as it is, in one line
    assert str(raised.value) == ("This image shows a person's face (1 found). "
                                 "Photos of people are not accepted; please upload another image.")
    assert raised.value.check.has_face and len(raised.value.check.boxes) == 1


def test_injected_detector_is_used_instead_of_mediapipe(portrait):
    seen = []

    def fake(rgb: np.ndarray):
        seen.append((rgb.shape, rgb.dtype))
        return [((10.0, 20.0, 50.5, 60.5), 0.9), ((0.0, 0.0, 5.0, 5.0), 0.3)]

    check = FaceGate(min_confidence=0.5, detector=fake).check(portrait.convert("RGBA"))
    assert check == FaceCheck(True, [(10, 20, 51, 61)], [0.9])  # the 0.3 one is below min_confidence
    assert seen == [((600, 512, 3), np.uint8)]
    assert not FaceGate(detector=lambda rgb: []).check(portrait).has_face  # MediaPipe would find one


def test_large_images_are_shrunk_and_boxes_come_back_in_image_pixels():
    shapes = []

    def fake(rgb: np.ndarray):
        shapes.append(rgb.shape)
        return [((100.0, 100.0, 200.0, 150.0), 0.8)]

    check = FaceGate(detector=fake).check(Image.new("RGB", (4096, 3072)))
    assert shapes == [(1536, 2048, 3)]
    assert check.boxes == [(200, 200, 400, 300)]


def test_gate_finds_the_face_from_4_threads_at_once(gate, portrait):
    start = threading.Barrier(4)

    def check(_):
        start.wait()
        return gate.check(portrait)

    with ThreadPoolExecutor(4) as pool:
        checks = list(pool.map(check, range(4)))
    assert all(c.has_face for c in checks)
    assert len({tuple(c.boxes) for c in checks}) == 1


def test_gate_runs_one_detection_at_a_time(portrait):
    inside, most = 0, 0
    count = threading.Lock()

    def slow(rgb: np.ndarray):
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)
        with count:
            inside -= 1
        return []

    gate = FaceGate(detector=slow)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(gate.check, [portrait] * 8))
    assert most == 1


def test_no_face_gate_accepts_a_portrait(portrait):
    gate = NoFaceGate()
    assert gate.check(portrait) == FaceCheck(False, [], [])
    gate.require_no_face(portrait)


def test_gate_works_again_after_close(portrait):
    gate = FaceGate()
    assert gate.check(portrait).has_face
    gate.close()
    assert gate.check(portrait).has_face
    gate.close()


def test_missing_mediapipe_says_how_to_install(monkeypatch, portrait):
    for name in [n for n in sys.modules if n == "mediapipe" or n.startswith("mediapipe.")] or ["mediapipe"]:
        monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like
    with pytest.raises(ImportError, match=r"pip install mediapipe==0\.10\.21"):
        FaceGate().check(portrait)


TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("turn", [90, 180, 270])
def test_a_photo_of_a_person_turned_on_its_side_or_upside_down_is_refused(gate, portrait, turn):
    turned = portrait.transpose(TURNS[turn])  # the pixels turned, no EXIF tag to undo it
    assert not FaceGate(turns=UPRIGHT).check(turned).has_face  # MediaPipe alone misses it
    check = gate.check(turned)
    assert check.has_face
    upright_face = Box(*GRACE_FACE)
    where = Box(*check.boxes[0]).turned_back(turn, portrait.size)  # back onto the upright photo
    assert centre_inside(where, upright_face)
    with pytest.raises(FaceRefused):
        gate.require_no_face(turned)


@pytest.mark.parametrize("turn", [90, 270])
def test_a_small_turned_face_in_a_landscape_is_refused(gate, portrait, turn):
    with Image.open(COLLECTION / "plasma-lake-twilight.jpg") as landscape:
        canvas = landscape.convert("RGB")
    canvas.paste(portrait.resize((60, 70)).transpose(TURNS[turn]), (200, 120))
    assert not FaceGate(turns=UPRIGHT).check(canvas).has_face
    check = gate.check(canvas)
    assert check.has_face and centre_inside(check.boxes[0], (200, 120, 270, 180))


def test_the_gate_stops_at_the_first_turn_that_shows_a_face(portrait):
    views = []

    def fake(rgb: np.ndarray):
        views.append(rgb.shape)
        return [((5.0, 10.0, 25.0, 40.0), 0.9)] if len(views) == 2 else []

    check = FaceGate(detector=fake).check(portrait)  # 512 x 600: turned a quarter it is 600 x 512
    assert views == [(600, 512, 3), (512, 600, 3)]
    assert check.boxes == [Box(5.0, 10.0, 25.0, 40.0).turned_back(90, (512, 600)).rounded_out((512, 600))]


class FakeWorkers(FaceGate):
    """A gate whose worker detectors are `make()`'s fakes, to see how turns are shared out."""
    def __init__(self, make, workers=2):
        super().__init__(workers=workers)
        self._make = make

    def _new_detector(self):
        return self._make()


def test_turns_checked_side_by_side_answer_with_the_first_turn_in_order(portrait):
    views = {turn: np.asarray(portrait.transpose(TURNS[turn]) if turn else portrait) for turn in (0, 90, 270, 180)}
    both_inside = threading.Barrier(2, timeout=10)  # broken unless two detections run at once

    class Fake:
        closed = 0

        def __call__(self, rgb: np.ndarray):
            turn = next(t for t, v in views.items() if v.shape == rgb.shape and np.array_equal(v, rgb))
            if turn in (0, 90):
                both_inside.wait()  # turns 0 and 90 start together on the two workers
            if turn == 90:
                time.sleep(0.2)  # 270 answers first, but 90 comes first in order
            return [((5.0, 10.0, 25.0, 40.0), 0.9)] if turn else []

        def close(self):
            Fake.closed += 1

    make = Fake

    gate = FakeWorkers(make)
    check = gate.check(portrait)
    assert check.boxes == [Box(5.0, 10.0, 25.0, 40.0).turned_back(90, (512, 600)).rounded_out((512, 600))]
    assert len(gate._made) == 2  # one detector per worker thread
    gate.close()
    assert gate._made == [] and gate._pool is None and Fake.closed == 2


@pytest.mark.parametrize("turn", [0, 90, 180])
def test_the_app_gate_with_two_workers_decides_as_the_one_worker_gate(gate, portrait, turn):
    two = FaceGate(workers=2)
    try:
        with Image.open(COLLECTION / "plasma-lake-twilight.jpg") as landscape:
            canvas = landscape.convert("RGB")
        canvas.paste(portrait.resize((60, 70)).transpose(TURNS[turn]) if turn else portrait.resize((60, 70)), (200, 120))
        for image in (portrait.transpose(TURNS[turn]) if turn else portrait, canvas, landscape.convert("RGB")):
            assert two.check(image) == gate.check(image)
        two.close()
        assert two.check(portrait).has_face  # works again after close
    finally:
        two.close()


def test_silences_in_two_threads_at_once_give_the_process_its_output_back():
    """MediaPipe's start-up lines are silenced by pointing fds 1 and 2 at /dev/null; the app's face-gate
    workers start their detectors at the same moment, and overlapping silences once left the whole
    process writing to /dev/null."""
    from dino_demo.quiet import silenced_output

    def where(fd):
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    before = [where(1), where(2)]
    inside, second_inside = threading.Event(), threading.Event()

    def first():
        with silenced_output():
            inside.set()
            second_inside.wait(0.5)  # the second silence begins meanwhile, if it may

    def second():
        inside.wait(5)
        with silenced_output():
            second_inside.set()
            time.sleep(0.2)  # and ends last

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [where(1), where(2)] == before
