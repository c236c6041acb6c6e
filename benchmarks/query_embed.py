"""Print the time to embed one query image on the CPU with each backend, and how close its features stay.

    python benchmarks/query_embed.py [--arch vits16,dinov2-small,dinov3-small] [--sizes 224,448] [--rounds 5] [--calls 20]
                                     [--backends torch,onnx-int8,onnx-int8-static]

Backends: torch (eager fp32, the fallback), onnx (ONNX Runtime fp32), onnx-int8 (dynamic int8 MatMuls),
and, for comparison (not offered by the app): onnx-int8-static (static QDQ int8 calibrated on the shipped
photos, the best static variant tried), onnx-int8-1t and onnx-int8-spin (the app's dynamic int8 export
in a session with 1 intra-op thread, or 2 that spin instead of sleeping while they wait for work) and
torch-int8 (torch.ao dynamic int8 Linear layers). The
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

BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int8-static", "onnx-int8-1t", "onnx-int8-spin", "torch-int8")


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


def make_embedders(folder: Path, cache: Path, input_size: int | None = None, names=BACKENDS) -> dict:
    from dino_demo.model import Embedder

    embedders = {name: Embedder(str(folder), device="cpu", backend=name, cache_dir=cache, batch_size=1,
                                input_size=input_size) for name in ("torch", "onnx", "onnx-int8")}
    for name, embedder in embedders.items():
        if embedder.backend != name:
            raise SystemExit(f"{name} did not load (got {embedder.backend}); see the warning above")
    onnx, dynamic = embedders["onnx"], embedders["onnx-int8"]
    variants = {"onnx-int8-static": lambda: static_int8(onnx, embedders["torch"]),
                "onnx-int8-1t": lambda: with_session(dynamic, "onnx-int8-1t", threads=1),
                "onnx-int8-spin": lambda: with_session(dynamic, "onnx-int8-spin", spinning=True),
                "torch-int8": lambda: torch_int8(embedders["torch"])}
    return {name: embedders[name] if name in embedders else variants[name]()
            for name in BACKENDS if name in names}  # in BACKENDS' order: torch, the reference, first


def torch_int8(embedder):
    """A copy of the torch `embedder` with torch.ao dynamic int8 Linear layers."""
    int8 = copy.copy(embedder)
    int8.model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(int8.model), {torch.nn.Linear}, torch.qint8)
    return int8


def static_int8(onnx, reference):
    """A copy of the fp32 `onnx` embedder running its export quantised statically, calibrated on the
    shipped photos prepared by the `reference` embedder as it prepares any image."""
    path = onnx._onnx.path.with_name(f"{onnx._onnx.path.stem}.static-int8.onnx")
    quantize_static_int8(onnx._onnx.path, path, calibration_pixels(reference))
    return with_session(onnx, "onnx-int8-static", path)


def calibration_pixels(embedder) -> np.ndarray:
    """The shipped photos as the Embedder feeds them to the backbone: (n, 3, S, S) normalised float32."""
    from dino_demo.config import BUNDLED_COLLECTION
    from dino_demo.images import load_image
    from dino_demo.model import prepare_image

    arrays = [prepare_image(load_image(p), embedder.input_size) for p in sorted(BUNDLED_COLLECTION.glob("*.jpg"))]
    return embedder._to_array(np.stack(arrays))


def quantize_static_int8(src: Path, dst: Path, pixels: np.ndarray) -> None:
    """Static QDQ int8 calibrated (MinMax) on `pixels`, the best of the static variants tried for ViT-S/16
    (uint8 activations, int8 weights per channel): only MatMuls with constant weights, their outputs left
    float so ONNX Runtime fuses each into a MatMulIntegerToFloat, as the dynamic export has. Quantising
    the attention MatMuls or the outputs too (QLinearMatMul) measured slower, and adding Add / Gemm / Conv
    dropped CLS cosines to ~0.93."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(pixels[i:i + 1] for i in range(len(pixels)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch}

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {w.name for w in graph.initializer}
    attention = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the "pre-process first" hint, as in onnx_backend._quantize
    try:
        quantize_static(str(src), str(dst), Photos(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=attention, extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})
    finally:
        root.setLevel(level)


def with_session(embedder, name: str, path: Path | None = None, threads: int | None = None, spinning: bool = True):
    """A copy of an ONNX `embedder` that runs `path` (default: its own export) in a session made as the app
    makes one (onnx_backend._session), but with `threads` intra-op threads and spinning on or off; its
    cosine checked against torch as the app checks an export."""
    import onnxruntime

    from dino_demo import onnx_backend

    path = path or embedder._onnx.path
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    cosine = onnx_backend._worst_cosine(embedder.model, session, onnx_backend._check_inputs(embedder.input_size),
                                        embedder._interpolate)
    fast = copy.copy(embedder)
    fast._onnx = onnx_backend.OnnxModel(session, name, path, cosine)  # its backend is `name`
    return fast


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
        print(f"{arch:13s} {name:16s} model p50 {np.median(model):6.1f} p95 {np.percentile(model, 95):6.1f} ms"
              f" | query p50 {np.median(query):6.1f} p95 {np.percentile(query, 95):6.1f} ms"
              f" | {base / np.median(model):4.2f}x torch | cos cls {cls:.4f} patch min {worst:.4f} mean {mean:.4f}"
              f"{f' | file {file_mb[name]:.0f} MB' if name in file_mb else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vits16,dinov2-small", help="vits16, dinov2-small and/or dinov3-small")
    p.add_argument("--sizes", default="224", help="input sides in pixels, e.g. 224,448 (multiples of 16 and 14: 224, 448)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the backends")
    p.add_argument("--calls", type=int, default=20, help="timed calls per backend, path and round")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"some of {', '.join(BACKENDS)} (torch is always run)")
    args = p.parse_args()
    savers = {"vits16": save_vits16, "dinov2-small": save_dinov2_small, "dinov3-small": save_dinov3_small}
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            folder = savers[arch](Path(tmp) / arch)
            for size in (int(x) for x in args.sizes.split(",")):
                started = time.perf_counter()
                embedders = make_embedders(folder, Path(tmp) / "onnx-cache", size, {"torch", *args.backends.split(",")})
                print(f"# {arch} at {size} px: loaded and exported in {time.perf_counter() - started:.1f} s")
                file_mb = {n: e._onnx.path.stat().st_size / 1e6 for n, e in embedders.items() if e._onnx}
                print(f"# load average before timing: {load()}")
                report(f"{arch}@{size}", measure(embedders, args.rounds, args.calls), closeness(embedders), file_mb)
                print(f"# load average after timing: {load()}")


def load() -> str:
    """The 1, 5 and 15 minute load averages: above the core count, other work shared the cores."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
