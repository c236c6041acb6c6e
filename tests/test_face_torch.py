"""Tests for dino_demo.face_torch: MediaPipe's face models in torch decide as the MediaPipe gate does.

Everything is checked against MediaPipe itself on CPU: OpenCV's warp (what MediaPipe's pre-processing
runs), each model view, and the whole gate on real and generated photos.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib import cbook
import torch
from PIL import Image

from conftest import write_imagefolder
from dino_demo.face_torch import (MODELS, TorchFaceDetector, TorchFaceGate, View, gate_factory, gate_needs_spawn,
                                  make_anchors, sample_views, tensor_gate_view, upload, weighted_nms)
from dino_demo.faces import FaceGate, MediaPipeDetector, ViewRequest, _detect, crop_black, gate_view, work_size
from index_builder.build import BuildOptions, build_index
from index_builder.source import open_source
from test_faces import make_face_free_images

COLLECTION = Path(__file__).resolve().parents[1] / "assets" / "collection"
TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
# Scores of the same view differ by at most 4.2e-7 (float arithmetic: XNNPACK against torch); a
# letterbox off by a rounding step (before OpenCV's was reproduced) moved them by 3e-3. 1e-4 tells the two apart.
SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE = 0.01  # pixels; measured: below 1e-3


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


@pytest.fixture(scope="module")
def detectors():
    mediapipe = MediaPipeDetector()
    yield mediapipe, TorchFaceDetector("cpu")
    mediapipe.close()


def opencv_letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """What MediaPipe's ImageToTensorCalculator does on CPU: its OpenCV converter, keep_aspect_ratio, -1..1."""
    h, w = rgb.shape[:2]
    side = float(max(w, h))
    corners = cv2.boxPoints(((w / 2, h / 2), (side, side), 0.0)).astype(np.float32)
    target = np.array([[0, size], [0, 0], [size, 0], [size, size]], np.float32)
    warped = cv2.warpPerspective(np.ascontiguousarray(rgb), cv2.getPerspectiveTransform(corners, target), (size, size),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped.astype(np.float32) * (2 / 255) - 1


@pytest.mark.parametrize("rect", [(0, 0, 512, 600), (0, 0, 512, 512), (-5, -16, 141, 131), (3, 7, 250, 100),
                                  (400, 500, 700, 650)])
def test_the_letterbox_is_opencvs_to_the_bit(portrait, rect):
    # Odd padding puts sample positions on half steps, where only OpenCV's own rounding noise decides.
    pictures = upload([np.asarray(portrait)], "cpu")
    views = [View(0, turn, ViewRequest("full", rect)) for turn in (0, 90, 180, 270)]
    for model in MODELS.values():
        together = sample_views(pictures, views, model.size).numpy()  # turns mixed in one pass
        for view, ours in zip(views, together):
            turned = np.asarray(portrait.transpose(TURNS[view.turn]) if view.turn else portrait)
            expected = opencv_letterbox(crop_black(turned, rect), model.size)
            assert np.array_equal(ours, expected)
            assert np.array_equal(sample_views(pictures, [view], model.size)[0].numpy(), expected)  # one turn


def test_anchors_are_one_per_model_output(detectors):
    _, torch_detector = detectors
    for name, model in MODELS.items():
        outputs = torch_detector.nets[name](sample_views(upload([np.zeros((9, 9, 3), np.uint8)], "cpu"),
                                                         [View(0, 0, ViewRequest(name, (0, 0, 9, 9)))], model.size))
        assert sorted(o.shape[1] for o in outputs) == [len(make_anchors(model))] * 2 == [{"short": 896, "full": 2304}[name]] * 2


def view_cases(portrait) -> list[tuple[str, np.ndarray, tuple[int, int, int, int]]]:
    small = portrait.resize((200, 234))
    landscape = np.asarray(Image.open(COLLECTION / "lomiri-dogs-at-window.jpg").convert("RGB"))
    wide = np.pad(np.asarray(portrait), ((0, 0), (300, 100), (0, 0)))
    return [("portrait", np.asarray(portrait), (0, 0, 512, 600)), ("small", np.asarray(small), (0, 0, 200, 234)),
            ("crop past the corner", np.asarray(small), (-40, 30, 100, 127)), ("wide", wide, (0, 0, 912, 600)),
            ("tile", wide, (200, 0, 712, 512)), ("landscape", landscape, (-40, 30, 170, 266))]


def test_each_view_finds_what_mediapipe_finds(detectors, portrait):
    mediapipe, torch_detector = detectors
    for name, rgb, rect in view_cases(portrait):
        pictures = upload([rgb], "cpu")
        for model in ("short", "full"):
            expected = _detect(mediapipe._models[model], crop_black(rgb, rect), rect[0], rect[1])
            found = torch_detector.run(pictures, [View(0, 0, ViewRequest(model, rect))])[0]
            assert len(found) == len(expected), (name, model)
            for (box, score), (want_box, want) in zip(sorted(found, key=lambda f: -f[1]), sorted(expected, key=lambda f: -f[1])):
                assert abs(score - want) < SCORE_TOLERANCE, (name, model)
                assert np.allclose(box, want_box, atol=BOX_TOLERANCE), (name, model)


def gate_cases(portrait) -> dict[str, Image.Image]:
    cases = {"portrait": portrait, "close-up": portrait.crop((160, 136, 377, 353))}
    cases.update({f"turned {t}": portrait.transpose(tr) for t, tr in TURNS.items()})
    canvas = Image.new("RGB", (1600, 1200), (128, 128, 128))
    canvas.paste(portrait.resize((128, 150), Image.LANCZOS), (700, 520))  # 49 px, across tile seams
    cases["small in a large canvas"] = canvas
    group = Image.new("RGB", (1400, 700), (90, 120, 90))
    for x, y, side in [(20, 30, 300), (400, 200, 200), (700, 50, 120), (1000, 300, 260)]:
        group.paste(portrait.resize((side, side * 600 // 512)), (x, y))
    cases["four faces"] = group
    for name in ("lomiri-dogs-at-window", "mate-orange-flower-petals", "plasma-lake-twilight"):
        cases[name] = Image.open(COLLECTION / f"{name}.jpg").convert("RGB")
    generated = make_face_free_images()
    cases.update({name: generated[name] for name in ("noise", "shapes", "tiny")})
    return cases


@pytest.fixture(scope="module")
def both_gates(portrait):
    cases = gate_cases(portrait)
    mediapipe = FaceGate()
    expected = {name: mediapipe.check(image) for name, image in cases.items()}
    mediapipe.close()
    found = dict(zip(cases, TorchFaceGate().check_many(list(cases.values()))))  # one batch
    return expected, found


@pytest.mark.parametrize("name", list(gate_cases(Image.new("RGB", (512, 600)))))
def test_the_torch_gate_decides_as_the_mediapipe_gate(both_gates, name):
    expected, found = both_gates
    want, got = expected[name], found[name]
    assert got.has_face == want.has_face and got.boxes == want.boxes
    assert np.allclose(got.scores, want.scores, atol=SCORE_TOLERANCE, rtol=0)


def test_the_expected_faces_are_there(both_gates):
    expected, found = both_gates
    assert [name for name, check in found.items() if check.has_face] == [
        "portrait", "close-up", "turned 90", "turned 180", "turned 270", "small in a large canvas", "four faces"]
    assert len(found["four faces"].boxes) == 4


def test_a_batch_checks_as_one_image_at_a_time(portrait):
    gate = TorchFaceGate()
    images = [portrait.transpose(TURNS[90]), make_face_free_images()["gradient"]]
    assert gate.check_many(images) == [gate.check(image) for image in images]


def test_a_picture_on_the_gpu_path_is_shrunk_as_pil_shrinks_it():
    rng = np.random.default_rng(0)
    for size in [(4033, 3025), (5712, 4284), (3000, 2000)]:  # whole factors 2 and 3 (odd edges), resampled
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        want = np.asarray(gate_view(Image.fromarray(array))).astype(int)
        got = tensor_gate_view(torch.from_numpy(array).permute(2, 0, 1)).numpy().astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= (1 if work_size(size)[1] > 1 else 2)  # PIL's fixed-point means round


def test_weighted_nms_averages_overlapping_boxes_by_score():
    found = np.array([[0.6, 0.0, 0.0, 1.0, 1.0],  # score, x0, y0, x1, y1
                      [0.9, 0.1, 0.1, 1.1, 1.1],
                      [0.7, 5.0, 5.0, 6.0, 6.0]])
    kept = weighted_nms(found)
    mean = (0.9 * found[1, 1:] + 0.6 * found[0, 1:]) / 1.5
    assert np.allclose(kept, [[0.9, *mean], [0.7, 5.0, 5.0, 6.0, 6.0]])
    assert weighted_nms(np.zeros((0, 5))).shape == (0, 5)


def test_the_builder_uses_torch_on_a_gpu_and_mediapipe_elsewhere():
    assert gate_factory("auto", "cpu") is FaceGate and gate_factory("auto", "mps") is FaceGate
    assert gate_factory("mediapipe", "cuda") is FaceGate and not gate_needs_spawn(FaceGate)
    on_gpu = gate_factory("auto", "cuda")
    assert on_gpu.func is TorchFaceGate and on_gpu.keywords == {"device": "cuda"} and gate_needs_spawn(on_gpu)
    asked = gate_factory("torch", "cpu")
    assert isinstance(asked(), TorchFaceGate) and asked().device == "cpu" and gate_needs_spawn(asked)
    with pytest.raises(ValueError, match="auto, mediapipe, torch"):
        gate_factory("dlib", "cpu")


@pytest.mark.parametrize("workers", [0, 1])  # 1: a spawned decoding process (a forked one hangs in torch)
def test_a_build_with_the_torch_gate_leaves_the_photo_of_a_person_out(tmp_path, embedder, portrait, workers):
    folder = write_imagefolder(tmp_path / "images", 3)
    portrait.transpose(TURNS[270]).save(folder / "img001.jpg")
    embedder.embed_prepared(np.zeros((1, embedder.input_size, embedder.input_size, 3), np.uint8), [(8, 8)])  # torch ran
    options = BuildOptions(workers=workers, skip_faces=True, face_gate_backend="torch", thumb_size=0)
    report = build_index(open_source(str(folder)), embedder, str(tmp_path / "idx"), options)
    assert report.indexed == 2 and report.skipped == {"face": 1}
