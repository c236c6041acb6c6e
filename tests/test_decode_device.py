"""Tests for the builder's GPU decoding path (--decode gpu: nvJPEG) and the content hashes that make it safe.

No GPU here: `FakeNvjpeg` stands in for torchvision's nvJPEG. It decodes with Pillow and then moves a few
pixel values by one, as another JPEG decoder's IDCT does, so any hash or output taken from the decoded pixels
of a plain JPEG would differ from a CPU build's, and these tests would fail.
"""
import io
import json
import subprocess
import sys
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib import cbook
from PIL import Image

from conftest import ROOT, make_image, write_imagefolder
from dino_demo.errors import UserError
from dino_demo.face_torch import TorchFaceGate
from dino_demo.images import content_hash, jpeg_data_hash, load_image
from dino_demo.index import load_index
from index_builder import build as build_module
from index_builder.build import JPEG_DATA, BuildOptions, Decoder, add_to_index, build_index, jpeg_codec
from index_builder.source import Row, open_source
from test_images import FakeGpuDecoder


class FakeNvjpeg:
    """nvJPEG's interface (dino_demo.images.Nvjpeg) on the CPU: decodes as another decoder would (a few values
    off by one) and records how many files it decoded and pictures it encoded, in this process."""
    decoded = encoded = 0

    def __init__(self, device: str):
        self.device = device

    def decode(self, files: list[bytes]):
        out = FakeGpuDecoder()(files)
        for picture in out:
            picture[:, ::7, ::5] ^= 1  # an IDCT that rounds differently
        FakeNvjpeg.decoded += len(files)
        return out

    def encode(self, pictures, quality: int) -> list[bytes]:
        FakeNvjpeg.encoded += len(pictures)
        out = []
        for picture in pictures:
            data = io.BytesIO()
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(data, "JPEG", quality=quality)
            out.append(data.getvalue())
        return out


def fake_nvjpeg(device: str) -> FakeNvjpeg:
    return FakeNvjpeg(device)


@pytest.fixture
def gpu(monkeypatch):
    """nvJPEG "available" on any device, through the builder's own choice of codec."""
    monkeypatch.setattr(build_module, "nvjpeg", fake_nvjpeg)
    FakeNvjpeg.decoded = FakeNvjpeg.encoded = 0


def mixed_folder(folder):
    """Plain JPEGs and what nvJPEG must not be given: a PNG, an EXIF-turned JPEG, a CMYK JPEG, a broken file."""
    write_imagefolder(folder, 8)
    make_image(20, (60, 44)).save(folder / "img008.jpg", "PNG")  # a PNG named .jpg: the header decides
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(21, (64, 48)).save(folder / "img009.jpg", exif=exif)
    make_image(22, (40, 40)).convert("CMYK").save(folder / "img010.jpg")
    (folder / "img011.jpg").write_bytes((folder / "img000.jpg").read_bytes()[:300])
    lines = (folder / "metadata.csv").read_text().splitlines()
    (folder / "metadata.csv").write_text("\n".join(lines + [f"img{i:03d}.jpg,picture {i}" for i in range(8, 12)]) + "\n")
    return folder


def build(folder, embedder, out, decode: str, workers: int = 0, progress=None, **options):
    options = BuildOptions(workers=workers, skip_faces=False, decode=decode, batch_size=4, **options)
    return build_index(open_source(str(folder)), embedder, str(out), options, progress)


def rows(index) -> list[dict]:
    return [{k: v for k, v in index.row(i).items() if k != "thumbnail"} for i in range(index.count)]


# --- hashes that do not depend on the decoder ---

def encoded(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **{"quality": 90, **save})
    return out.getvalue()


def test_a_jpeg_is_hashed_by_its_image_data_not_its_metadata():
    image = make_image(1, (80, 60))
    exif = Image.Exif()
    exif[0x010F] = "a camera maker"
    plain = encoded(image)
    assert jpeg_data_hash(encoded(image, exif=exif)) == jpeg_data_hash(plain)
    assert jpeg_data_hash(encoded(image, comment=b"a comment")) == jpeg_data_hash(plain)
    assert jpeg_data_hash(encoded(make_image(2, (80, 60)))) != jpeg_data_hash(plain)
    assert jpeg_data_hash(encoded(image, quality=60)) != jpeg_data_hash(plain)
    assert jpeg_data_hash(plain) != content_hash(load_image(plain))  # two kinds of hash never meet
    assert jpeg_data_hash(b"\xff\xd8\xff\x00garbage") == jpeg_data_hash(b"\xff\xd8\xff\x00garbage")


def test_content_hash_of_an_array_is_that_of_its_image():
    image = make_image(3, (50, 30))
    assert content_hash(np.asarray(image)) == content_hash(image)


# --- the builder on the "GPU" ---

@pytest.mark.parametrize("workers", [0, 1])  # 1: a spawned decoding process makes its own codec
def test_a_gpu_decoded_build_equals_a_cpu_build(tmp_path, embedder, gpu, workers):
    folder = mixed_folder(tmp_path / "images")
    cpu = build(folder, embedder, tmp_path / "cpu", "cpu", thumb_size=32)
    assert FakeNvjpeg.decoded == 0
    on_gpu = build(folder, embedder, tmp_path / "gpu", "gpu", workers=workers, thumb_size=32)
    if workers == 0:  # the 8 plain JPEGs; every thumbnail, since the other files join them on the device
        assert FakeNvjpeg.decoded == 8 and FakeNvjpeg.encoded == 11
    assert on_gpu.indexed == cpu.indexed == 11 and on_gpu.skipped == cpu.skipped == {"unreadable image": 1}
    a, b = load_index(tmp_path / "cpu"), load_index(tmp_path / "gpu")
    assert rows(a) == rows(b)  # ids, source rows, sizes, labels and hashes
    assert a.manifest["content_hash"] == b.manifest["content_hash"] == JPEG_DATA
    cosine = np.sum(a.vectors() * b.vectors(), axis=-1)
    assert cosine.min() > 0.99 and not np.allclose(a.vectors(), b.vectors(), atol=1e-6)  # decoded elsewhere
    for i in range(b.count):  # the thumbnails from the GPU's codec show the same picture
        cpu_thumb, gpu_thumb = (np.asarray(Image.open(io.BytesIO(x.row(i)["thumbnail"])), np.float32) for x in (a, b))
        assert cpu_thumb.shape == gpu_thumb.shape and np.abs(cpu_thumb - gpu_thumb).mean() < 6


def test_images_a_gpu_build_indexed_are_copies_to_a_cpu_add_and_the_other_way(tmp_path, embedder, gpu):
    folder = mixed_folder(tmp_path / "images")
    source = open_source(str(folder))
    for first, then in (("gpu", "cpu"), ("cpu", "gpu")):
        out = tmp_path / f"{first}-then-{then}"
        build(folder, embedder, out, first)
        report = add_to_index(source, embedder, str(out), BuildOptions(workers=0, decode=then))
        assert report.indexed == 0 and report.skipped == {"duplicate": 11, "unreadable image": 1}, (first, then)


def test_the_gpu_path_checks_faces_on_the_decoded_tensors(tmp_path, embedder, gpu):
    folder = write_imagefolder(tmp_path / "images", 4)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        (folder / "img001.jpg").write_bytes(f.read())
    options = BuildOptions(workers=0, skip_faces=True, face_gate_backend="torch", decode="gpu", thumb_size=0)
    report = build_index(open_source(str(folder)), embedder, str(tmp_path / "idx"), options)
    assert FakeNvjpeg.decoded == 4 and report.indexed == 3 and report.skipped == {"face": 1}
    assert 1 not in [r["source_row"] for r in rows(load_index(tmp_path / "idx"))]


def test_the_torch_gate_decides_alike_on_tensors_and_on_pil_images():
    import torch

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        portrait = Image.open(f).convert("RGB")
    large = make_image(5, (2100, 1200))  # over the gate's 2048 px: shrunk first, on the tensor's device
    pictures = [portrait, portrait.rotate(90, expand=True), make_image(4, (300, 200)), large]
    gate = TorchFaceGate()
    on_pil = gate.check_many(pictures)
    on_tensors = gate.check_many([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pictures])
    assert [c.has_face for c in on_tensors] == [c.has_face for c in on_pil] == [True, True, False, False]
    for a, b in zip(on_pil, on_tensors):
        assert a.boxes == b.boxes and np.allclose(a.scores, b.scores, atol=1e-6)


# --- when the GPU may not decode ---

def test_the_builder_decodes_on_the_gpu_only_where_it_can_and_says_so_when_asked_wrongly(monkeypatch):
    assert jpeg_codec("cpu", "cuda", JPEG_DATA) is None
    assert jpeg_codec("auto", "cpu", JPEG_DATA) is None
    monkeypatch.setattr(build_module, "nvjpeg", lambda device: None)  # no CUDA, or no torchvision for it
    assert jpeg_codec("auto", "cuda", JPEG_DATA) is None
    with pytest.raises(UserError, match="torchvision") as error:
        jpeg_codec("gpu", "cpu", JPEG_DATA)
    assert "\n" not in str(error.value)
    monkeypatch.setattr(build_module, "nvjpeg", fake_nvjpeg)
    assert jpeg_codec("auto", "cuda", JPEG_DATA)().device == "cuda"
    assert jpeg_codec("auto", "cuda", None) is None  # an index of pixel hashes: Pillow decodes, as it did
    with pytest.raises(UserError, match="--decode cpu"):
        jpeg_codec("gpu", "cuda", None)


def test_pixel_hashes_are_kept_for_an_index_built_before_and_its_copies_still_found(tmp_path, embedder, gpu):
    folder = mixed_folder(tmp_path / "images")
    out = tmp_path / "idx"
    build(folder, embedder, out, "cpu")
    make_legacy(out, folder)
    source = open_source(str(folder))
    report = add_to_index(source, embedder, str(out), BuildOptions(workers=0, decode="auto"))
    assert report.indexed == 0 and report.skipped == {"duplicate": 11, "unreadable image": 1}
    assert FakeNvjpeg.decoded == 0 and "content_hash" not in load_index(out).manifest
    with pytest.raises(UserError, match="--decode cpu"):
        add_to_index(source, embedder, str(out), BuildOptions(workers=0, decode="gpu"))


def test_a_rebuild_keeps_pixel_hashes_while_they_keep_removed_images_out(tmp_path, embedder, gpu):
    from dino_demo.index_update import remove_images

    folder = mixed_folder(tmp_path / "images")
    out = tmp_path / "idx"
    build(folder, embedder, out, "cpu")
    make_legacy(out, folder)
    removed = {r["source_row"] for r in rows(load_index(out))[:2]}
    remove_images(out, [0, 1], "test")
    report = build_index(open_source(str(folder)), embedder, str(out), BuildOptions(workers=0, decode="auto"),
                         rebuild=True)
    index = load_index(out)
    assert report.skipped == {"removed earlier": 2, "unreadable image": 1} and FakeNvjpeg.decoded == 0
    assert "content_hash" not in index.manifest or index.manifest["content_hash"] is None
    assert removed.isdisjoint(r["source_row"] for r in rows(index))
    # With nothing removed, a rebuild starts hashing JPEGs by their data, and may decode on the GPU.
    build(folder, embedder, tmp_path / "fresh", "cpu")
    make_legacy(tmp_path / "fresh", folder)
    build_index(open_source(str(folder)), embedder, str(tmp_path / "fresh"), BuildOptions(workers=0, decode="gpu"),
                rebuild=True)
    assert load_index(tmp_path / "fresh").manifest["content_hash"] == JPEG_DATA and FakeNvjpeg.decoded == 8


class Stop(Exception):
    pass


def test_a_build_begun_before_jpegs_were_hashed_by_their_data_resumes_as_begun(tmp_path, embedder, gpu):
    folder = mixed_folder(tmp_path / "images")
    out = tmp_path / "idx"

    def stop_at_row_4(decoded):
        if decoded.last_row >= 4:
            raise Stop

    with pytest.raises(Stop):
        build(folder, embedder, out, "cpu", chunk_size=4, progress=stop_at_row_4)
    info_path = out / "_build" / "build.json"
    info = json.loads(info_path.read_text())
    del info["content_hash"]  # as a run of before wrote it, with pixel hashes in its chunks
    info_path.write_text(json.dumps(info))
    report = build(folder, embedder, out, "auto", chunk_size=4)
    assert report.resumed_from == 4 and report.indexed == 11 and FakeNvjpeg.decoded == 0
    assert "content_hash" not in load_index(out).manifest


def test_a_decoder_for_pixel_hashes_never_uses_the_codec():
    image = make_image(6, (40, 30))
    data = encoded(image)
    decoder = Decoder(16, 0, 10**6, None, hashes=None, codec=partial(fake_nvjpeg, "cpu"))
    FakeNvjpeg.decoded = 0
    out = decoder([Row(0, {"bytes": data, "path": None}, "x")])
    assert FakeNvjpeg.decoded == 0 and out.meta[0]["hash"] == content_hash(load_image(data))


def make_legacy(out, folder) -> None:
    """Turn a freshly built index into one made before JPEG_DATA: no "content_hash", every hash of pixels."""
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["content_hash"]
    manifest_path.write_text(json.dumps(manifest))
    meta_path = out / manifest["segments"][0]["dir"] / "meta.parquet"
    table = pq.read_table(meta_path)
    files = sorted(p for p in folder.glob("*.jpg"))
    hashes = [content_hash(load_image(files[row])) for row in table.column("source_row").to_pylist()]
    table = table.set_column(table.schema.get_field_index("hash"), "hash", [hashes])
    pq.write_table(table, meta_path)


@pytest.mark.parametrize("extra, says", [([], "--decode gpu needs the model on a CUDA GPU (it is on cpu)"),
                                         (["--ray", "auto"], "With --ray the cluster's CPU workers decode")])
def test_the_command_refuses_decode_gpu_where_it_cannot_in_one_line(tmp_path, tiny_vit, extra, says):
    folder = write_imagefolder(tmp_path / "images", 2)
    done = subprocess.run([sys.executable, "-m", "index_builder", "--dataset", str(folder), "--model", str(tiny_vit),
                           "--out", str(tmp_path / "idx"), "--device", "cpu", "--decode", "gpu", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], done.stderr
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_nvjpeg_calls_torchvision_as_its_gpu_api_asks(monkeypatch):
    """torchvision cannot load beside a CPU build of torch, so its io module is stood in for: what the codec
    hands it (uint8 file tensors, RGB mode, the device; pictures and a quality) and makes of its answers."""
    import types

    import torch

    from dino_demo.images import Nvjpeg

    calls = {}

    def decode_jpeg(data, mode, device):
        calls["decode"] = ([bytes(d.numpy()) for d in data], mode, device)
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in data]

    def encode_jpeg(pictures, quality):
        calls["encode"] = (len(pictures), quality)
        return [torch.tensor([255, 216, 255, i], dtype=torch.uint8) for i in range(len(pictures))]

    io_module = types.SimpleNamespace(decode_jpeg=decode_jpeg, encode_jpeg=encode_jpeg,
                                      ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=io_module))
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
    codec = Nvjpeg("cuda:1")
    assert [t.shape for t in codec.decode([b"\xff\xd8one", b"\xff\xd8two"])] == [(3, 2, 2)] * 2
    assert calls["decode"] == ([b"\xff\xd8one", b"\xff\xd8two"], "RGB", "cuda:1")
    assert codec.encode([torch.zeros(3, 2, 2, dtype=torch.uint8)] * 2, 80) == [b"\xff\xd8\xff\x00", b"\xff\xd8\xff\x01"]
    assert calls["encode"] == (2, 80)
