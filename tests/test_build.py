import io
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_image, write_imagefolder
from dino_demo.faces import FaceCheck, FaceGate
from dino_demo.index import load_index
from dino_demo.search import search_image, search_region
from index_builder.build import BuildOptions, build_index, default_batch_size, default_workers
from index_builder.source import open_source


def build(folder, embedder, out, **options):
    source = open_source(str(folder))
    return build_index(source, embedder, str(out), BuildOptions(workers=0, skip_faces=False, **options))


def test_each_indexed_image_finds_itself_at_rank_one(image_folder, embedder, tmp_path):
    report = build(image_folder, embedder, tmp_path / "idx", batch_size=5, chunk_size=4, thumb_size=32)
    index = load_index(tmp_path / "idx", embedder.describe())
    assert report.indexed == index.count == 12
    for image_id in range(index.count):
        row = index.row(image_id)
        image = make_image(row["source_row"], (row["width"], row["height"]))
        features = embedder.embed([image])
        hit = search_image(index, features, k=1)[0]
        assert hit.id == image_id and hit.score > 0.99  # JPEG round trip: not exactly 1
        whole = (0, 0, row["width"], row["height"])
        assert search_region(index, features, whole, k=1)[0].id == image_id
    assert index.row(3)["label"] == "picture 3"
    assert max(Image_size(index.row(0)["thumbnail"])) == 32


def Image_size(jpeg: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).size


def test_worker_processes_give_the_same_index_as_one_process(image_folder, embedder, tmp_path):
    build(image_folder, embedder, tmp_path / "one", batch_size=4)
    source = open_source(str(image_folder))
    build_index(source, embedder, str(tmp_path / "two"), BuildOptions(workers=2, batch_size=3, skip_faces=False))
    one, two = load_index(tmp_path / "one"), load_index(tmp_path / "two")
    np.testing.assert_allclose(one.vectors(), two.vectors(), atol=1e-5)


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, embedder):
    folder = write_imagefolder(tmp_path / "images", 6)
    (folder / "img001.jpg").write_bytes(b"not a jpeg at all")
    data = (folder / "img002.jpg").read_bytes()
    (folder / "img002.jpg").write_bytes(data[: len(data) // 3])
    report = build(folder, embedder, tmp_path / "idx")
    assert report.indexed == 4
    assert report.skipped == {"unreadable image": 2}
    index = load_index(tmp_path / "idx")
    assert index.manifest["skipped"] == {"unreadable image": 2}
    assert [index.row(i)["source_row"] for i in range(4)] == [0, 3, 4, 5]


def test_parquet_with_missing_values_and_class_labels(tmp_path, embedder):
    import datasets

    images = [{"bytes": _jpeg(make_image(i)), "path": None} for i in range(5)]
    images[2] = None
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    table = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1, 1]}, features=features)
    table.to_parquet(str(tmp_path / "data.parquet"))
    report = build(tmp_path / "data.parquet", embedder, tmp_path / "idx")
    assert report.indexed == 4 and report.skipped == {"missing image": 1}
    index = load_index(tmp_path / "idx")
    assert [index.row(i)["label"] for i in range(4)] == ["cat", "dog", "dog", "dog"]


def _jpeg(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def test_streaming_and_limit(image_folder, embedder, tmp_path):
    source = open_source(str(image_folder), streaming=True)
    report = build_index(source, embedder, str(tmp_path / "idx"), BuildOptions(workers=0, limit=7, skip_faces=False))
    assert report.indexed == 7 and load_index(tmp_path / "idx").count == 7


@pytest.mark.parametrize("turn", [0, 90])
def test_photos_of_people_are_kept_out_and_counted(tmp_path, embedder, turn):
    from matplotlib import cbook
    from PIL import Image

    folder = write_imagefolder(tmp_path / "images", 3)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        Image.open(f).rotate(turn, expand=True).save(folder / "img001.jpg")  # on its side too
    source = open_source(str(folder))
    report = build_index(source, embedder, str(tmp_path / "idx"), BuildOptions(workers=0, skip_faces=True))
    assert report.indexed == 2 and report.skipped == {"face": 1}
    assert [load_index(tmp_path / "idx").row(i)["source_row"] for i in range(2)] == [0, 2]


class WideIsAFace(FaceGate):
    """A stand-in face gate that refuses every landscape image (picklable: it goes to decoding processes)."""

    def check(self, image):
        return FaceCheck(image.width > image.height, [], [])


@pytest.mark.parametrize("workers", [0, 2])
def test_the_builders_face_gate_is_the_one_it_is_given_in_every_decoding_process(tmp_path, embedder, workers):
    folder = write_imagefolder(tmp_path / "images", 6)  # sizes cycle: 96x72 (wide), 64x64, 50x120
    source = open_source(str(folder))
    options = BuildOptions(workers=workers, batch_size=2, skip_faces=True)
    report = build_index(source, embedder, str(tmp_path / "idx"), options, gate=WideIsAFace)
    assert report.skipped == {"face": 2}
    assert [load_index(tmp_path / "idx").row(i)["source_row"] for i in range(4)] == [1, 2, 4, 5]
    kept = build_index(open_source(str(folder)), embedder, str(tmp_path / "all"),
                       BuildOptions(workers=workers, batch_size=2, skip_faces=False), gate=WideIsAFace)
    assert kept.indexed == 6  # --no-skip-faces: the gate is not asked


class TurnsRecorder(FaceGate):
    made: list = []

    def __init__(self, **kwargs):
        super().__init__(detector=lambda rgb: [], **kwargs)
        TurnsRecorder.made.append(self.turns)


def test_turned_faces_are_looked_for_unless_the_build_says_not_to(tmp_path, embedder, image_folder):
    from dino_demo.faces import ALL_TURNS, UPRIGHT

    for turned, expected in ((True, ALL_TURNS), (False, UPRIGHT)):
        TurnsRecorder.made.clear()
        options = BuildOptions(workers=0, skip_faces=True, turned_faces=turned, limit=2)
        report = build_index(open_source(str(image_folder)), embedder, str(tmp_path / f"idx-{turned}"), options,
                             gate=TurnsRecorder)
        assert TurnsRecorder.made == [expected] and report.manifest["turned_faces"] is turned


def test_push_to_hub_offline_keeps_the_index_and_says_how_to_upload_it(tmp_path, tiny_vit):
    folder = write_imagefolder(tmp_path / "images", 3)
    out = tmp_path / "idx"
    done = subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(folder), "--model", str(tiny_vit),
                           "--out", str(out), "--workers", "0", "--no-skip-faces", "--push-to-hub", "me/my-index"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Cannot reach the Hugging Face Hub") and "hf upload --repo-type dataset me/my-index" in last
    assert load_index(out).count == 3  # the build itself is kept


def test_push_to_hub_uploads_the_finished_files_only(monkeypatch, tmp_path, embedder, image_folder):
    import huggingface_hub

    from index_builder import hub_upload

    build(image_folder, embedder, tmp_path / "idx", limit=3)
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))

    monkeypatch.setattr(hub_upload, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub_upload.upload_index(tmp_path / "idx", "me/my-index")
    assert url == "https://huggingface.co/datasets/me/my-index"
    assert calls[0] == ("create", "me/my-index", {"repo_type": "dataset", "private": False, "exist_ok": True})
    upload = calls[1][1]
    assert upload["folder_path"] == str(tmp_path / "idx") and upload["repo_type"] == "dataset"
    assert "_build/**" in upload["ignore_patterns"]
    assert {"seg-*/**", "removed-*", "manifest.json"} <= set(upload["delete_patterns"])  # no stale segment stays up


def test_salient_patches_from_the_builder_find_each_image_with_a_box_inside_it(image_folder, embedder, tmp_path):
    report = build(image_folder, embedder, tmp_path / "idx", patches="salient:6")
    index = load_index(tmp_path / "idx", embedder.describe())
    assert report.manifest["patches"] == {"mode": "salient", "keep": 6} and index.patches_per_image == 6
    for image_id in range(index.count):
        row = index.row(image_id)
        w, h = row["width"], row["height"]
        hit = search_region(index, embedder.embed([make_image(row["source_row"], (w, h))]), (0, 0, w, h), k=1)[0]
        assert hit.id == image_id
        x0, y0, x1, y1 = hit.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_cli_defaults_use_large_batches_on_a_gpu_and_every_core_but_one(monkeypatch, tmp_path, tiny_vit):
    assert default_batch_size("cuda") == 256 and default_batch_size("cpu") == default_batch_size("mps") == 64
    for cores, workers in ((16, 15), (2, 1), (1, 1), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert default_workers() == workers
    folder = write_imagefolder(tmp_path / "images", 2)
    done = subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(folder), "--model", str(tiny_vit),
                           "--out", str(tmp_path / "idx"), "--device", "cpu", "--workers", "1", "--no-skip-faces"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on cpu (batch 64, 1 decoding process)" in done.stderr  # the default reached the build
