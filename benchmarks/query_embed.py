"""Print the time to embed one query image on the CPU with each backend, and how close its features stay.

    python benchmarks/query_embed.py [--arch vits16,dinov2-small,dinov3-small] [--sizes 224,448] [--rounds 5] [--calls 20]

Backends: torch (eager fp32, the fallback), onnx (ONNX Runtime fp32), onnx-int8 (dynamic int8 MatMuls),
and torch-int8 (torch.ao dynamic int8 Linear layers, for comparison; not offered by the app). The
backends are timed in interleaved rounds so that load from other processes hits them alike; each
figure is ms for one image at batch 1: `model` from prepared S x S pixels (S in --sizes), `query` from a
640x480 picture (resize included), as the app's Embedder.embed([image]) does it. Cosines compare
each backend's L2-normalised CLS and patch features with torch fp32 on 8 photo-like random images.
Weights are random (the real shapes): int8 error on trained weights can differ, which is why the
app checks each export against torch on the real model before using it.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)

BACKENDS = ("torch", "onnx", "onnx-int8", "torch-int8")


def save_dinov2_small(folder: Path) -> Path:
    """Random weights in facebook/dinov2-small's shape (384 dims, 12 layers, patch 14: 256 patches at 224)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                             image_size=518, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                      do_center_crop=True).save_pretrained(folder)
    return folder


def save_dinov3_small(folder: Path) -> Path:
    """Random weights in facebook/dinov3-vits16-pretrain-lvd1689m's shape (384 dims, 12 layers, patch 16,
    4 registers, rotary positions); its processor settings written as the hub has them."""
    import json

    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                   intermediate_size=1536, image_size=224, patch_size=16,
                                   num_register_tokens=4)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "size": {"height": 224, "width": 224}}))
    return folder


def photo_like(seed: int, size=(640, 480)) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def make_embedders(folder: Path, cache: Path, input_size: int | None = None) -> dict:
    from dino_demo.model import Embedder

    embedders = {name: Embedder(str(folder), device="cpu", backend=name, cache_dir=cache, batch_size=1,
                                input_size=input_size) for name in ("torch", "onnx", "onnx-int8")}
    for name, embedder in embedders.items():
        if embedder.backend != name:
            raise SystemExit(f"{name} did not load (got {embedder.backend}); see the warning above")
    int8 = copy.copy(embedders["torch"])
    int8.model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(int8.model), {torch.nn.Linear}, torch.qint8)
    return {**embedders, "torch-int8": int8}


def time_calls(call, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def measure(embedders: dict, rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    """ms per call for each backend and path, gathered in interleaved rounds."""
    image = photo_like(0)
    from dino_demo.model import prepare_image

    pixels = prepare_image(image, embedders["torch"].input_size)[None]
    paths = {"model": lambda e: e.embed_prepared(pixels, [image.size]), "query": lambda e: e.embed([image])}
    times = {name: {path: [] for path in paths} for name in embedders}
    for name, embedder in embedders.items():  # warm-up: first runs allocate and pick kernels
        time_calls(lambda: paths["query"](embedder), 3)
    for _ in range(rounds):
        for name, embedder in embedders.items():
            for path, run in paths.items():
                times[name][path] += time_calls(lambda: run(embedder), calls)
    return times


def closeness(embedders: dict) -> dict[str, tuple[float, float, float]]:
    """(worst CLS cosine, worst patch cosine, mean patch cosine) of each backend against torch fp32."""
    images = [photo_like(seed) for seed in range(1, 9)]
    reference = embedders["torch"].embed(images)
    result = {}
    for name, embedder in embedders.items():
        got = embedder.embed(images)
        cls, patches = np.sum(got.cls * reference.cls, -1), np.sum(got.patches * reference.patches, -1)
        result[name] = (float(cls.min()), float(patches.min()), float(patches.mean()))
    return result


def report(arch: str, times: dict, close: dict, file_mb: dict) -> None:
    base = np.median(times["torch"]["model"])
    for name in times:
        model, query = np.array(times[name]["model"]), np.array(times[name]["query"])
        cls, worst, mean = close[name]
        print(f"{arch:13s} {name:10s} model p50 {np.median(model):6.1f} p95 {np.percentile(model, 95):6.1f} ms"
              f" | query p50 {np.median(query):6.1f} p95 {np.percentile(query, 95):6.1f} ms"
              f" | {base / np.median(model):4.2f}x torch | cos cls {cls:.4f} patch min {worst:.4f} mean {mean:.4f}"
              f"{f' | file {file_mb[name]:.0f} MB' if name in file_mb else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vits16,dinov2-small", help="vits16, dinov2-small and/or dinov3-small")
    p.add_argument("--sizes", default="224", help="input sides in pixels, e.g. 224,448 (multiples of 16 and 14: 224, 448)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the backends")
    p.add_argument("--calls", type=int, default=20, help="timed calls per backend, path and round")
    args = p.parse_args()
    savers = {"vits16": save_vits16, "dinov2-small": save_dinov2_small, "dinov3-small": save_dinov3_small}
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            folder = savers[arch](Path(tmp) / arch)
            for size in (int(x) for x in args.sizes.split(",")):
                started = time.perf_counter()
                embedders = make_embedders(folder, Path(tmp) / "onnx-cache", size)
                print(f"# {arch} at {size} px: loaded and exported in {time.perf_counter() - started:.1f} s")
                file_mb = {n: e._onnx.path.stat().st_size / 1e6 for n, e in embedders.items() if e._onnx}
                report(f"{arch}@{size}", measure(embedders, args.rounds, args.calls), closeness(embedders), file_mb)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
