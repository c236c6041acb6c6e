"""Shared fixtures: tiny random DINO-shaped models saved to disk, generated images, no network."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
# Every cache (ours: ONNX exports, the bundled collection's index; datasets' and the hub's; matplotlib's)
# goes to one temporary folder, set before any library reads it: the suite leaves the user's home alone.
CACHE_ROOT = Path(tempfile.mkdtemp(prefix="dino-demo-tests-"))
atexit.register(shutil.rmtree, CACHE_ROOT, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = str(CACHE_ROOT)
os.environ["HF_HOME"] = str(CACHE_ROOT / "huggingface")
os.environ["MPLCONFIGDIR"] = str(CACHE_ROOT / "matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_model(folder: Path, kind: str = "vit") -> Path:
    """Save a small random model of the given family, with its image processor, to `folder`."""
    import torch
    from transformers import (BitImageProcessor, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel, ViTConfig, ViTImageProcessor, ViTModel)

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if kind == "vit":
        model = ViTModel(ViTConfig(**common, intermediate_size=64, image_size=64, patch_size=16), add_pooling_layer=False)
        processor = ViTImageProcessor(size={"height": 64, "width": 64})
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**common, mlp_ratio=2, image_size=56, patch_size=14))
        processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True)
    elif kind == "dinov2-registers":
        config = Dinov2WithRegistersConfig(**common, mlp_ratio=2, image_size=56, patch_size=14, num_register_tokens=4)
        model = Dinov2WithRegistersModel(config)
        processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True)
    elif kind == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        model = DINOv3ViTModel(DINOv3ViTConfig(**common, intermediate_size=64, image_size=64, patch_size=16,
                                               num_register_tokens=4))
        processor = None  # its class needs torchvision: written as the hub has it, below
    else:
        raise ValueError(kind)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    else:
        import json

        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "size": {"height": 64, "width": 64}, "resample": 2}))
    return folder


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dino-vit", "vit")


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dinov2", "dinov2")


@pytest.fixture(scope="session")
def tiny_registers(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dinov2-reg", "dinov2-registers")


@pytest.fixture(scope="session")
def tiny_dinov3(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dinov3-vit", "dinov3")


@pytest.fixture(scope="session")
def embedder(tiny_vit):
    from dino_demo.model import Embedder

    return Embedder(str(tiny_vit), device="cpu", batch_size=8)


def make_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct picture per seed: a noisy background with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def write_imagefolder(folder: Path, count: int, sizes=((96, 72), (64, 64), (50, 120))) -> Path:
    """`count` generated JPEGs plus a metadata.csv of labels, readable by datasets' imagefolder."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,label"]
    for i in range(count):
        make_image(i, sizes[i % len(sizes)]).save(folder / f"img{i:03d}.jpg", quality=92)
        lines.append(f"img{i:03d}.jpg,picture {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_imagefolder(tmp_path / "images", 12)


# --- the running app, for test_api.py and test_browser.py ----------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, tiny_vit):
    """The real app (real MediaPipe face gate) on a free local port, serving the bundled collection
    indexed with the tiny model at 224 px (a 14 x 14 grid, so matches and boxes look like the real thing)."""
    from dino_demo.config import Settings
    from app import open_engine
    from dino_demo.ui import build_ui, launch_options

    settings = Settings(model=str(tiny_vit), device="cpu", input_size=224, k=6, port=free_port(),
                        host="127.0.0.1", cache_dir=tmp_path_factory.mktemp("app-cache"))
    engine = open_engine(settings)
    demo = build_ui(engine, settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings, engine))
    yield f"http://127.0.0.1:{settings.port}/", engine
    demo.close()


@pytest.fixture
def upload_dir():
    """A folder inside Gradio's upload folder, where an upload through the browser lands."""
    import uuid

    from gradio import utils as gr_utils

    folder = Path(gr_utils.get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def index_file(folder: Path, name: str) -> Path:
    """Where a file of a freshly built index lies: the manifest on top, the rest in its one segment."""
    return folder / name if name == "manifest.json" else folder / "seg-000000" / name


# --- short clips, for the video part of "What DINO sees" ------------------------------------------

def face_photo_path() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def write_clip(path: Path, seconds: float = 2.0, fps: int = 24, size: tuple[int, int] = (320, 240),
               codec: str = "libx264", face_at: int | None = None) -> Path:
    """A clip panning across a bundled photo (the frame `face_at`, if given, shows a person's face instead),
    written with PyAV: MP4 for libx264, WebM for libvpx, GIF for gif."""
    import av

    photo = Image.open(ROOT / "assets" / "collection" / "mate-red-marigold.jpg").convert("RGB")
    face = Image.open(face_photo_path()).convert("RGB").resize(size)
    count, (w, h) = round(seconds * fps), size
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(count):
            x = round((photo.width - w) * i / max(1, count - 1))
            frame = face if i == face_at else photo.crop((x, 0, x + w, min(h, photo.height))).resize(size)
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode())
    return path
