"""Print embedder and index-build throughput for ViT-S/16 at 224 px (random weights of the real size).

    python benchmarks/embed.py [--device cpu|cuda] [--images 256] [--workers N] [--face-gate-backend auto]

Figures: model-only images/s per batch size (fp32, and bf16 on GPU); JPEG decode + resize images/s
with the builder's worker processes; decode + face gate (the builder's gate: MediaPipe, or its models
batched in torch); on a GPU with torchvision, nvJPEG alone and the builder's decoding with nvJPEG, without
and with the gate; the whole builder (decode -> embed -> write, `--decode auto` by default) with the gate
off and on. Each is also given as a share of the model's limit. Last, the face
gate's time per photo: MediaPipe against the torch detector on the CPU (and on the GPU when there is one).
`--layers 2` times a 2-layer ViT-S/16 instead, for a quick run on a small CPU.
"""
from __future__ import annotations

import argparse
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


def write_jpegs(folder: Path, count: int) -> Path:
    """`count` 640x480 photo-like JPEGs (smooth noise), about the size of a dataset image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def time_model(embedder, batch: int, seconds: float) -> float:
    pixels = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    sizes = [(224, 224)] * batch
    embedder.embed_prepared(pixels, sizes)  # warm-up
    if embedder.device == "cuda":
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed_prepared(pixels, sizes)
        done += batch
    if embedder.device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def time_decode(folder: Path, workers: int, gate=None, batch: int = 64, codec=None) -> float:
    """The builder's decode stage (decode, face gate when `gate` makes one, resize) in images/s; with a `codec`
    (index_builder.build.jpeg_codec: nvJPEG) the JPEGs are decoded on the GPU, as `--decode gpu` builds."""
    from dino_demo.images import DEFAULT_MAX_PIXELS
    from index_builder.build import Decoder, _batches, _decoded
    from index_builder.source import open_source

    source = open_source(str(folder))
    decoder = Decoder(224, 0, DEFAULT_MAX_PIXELS, gate, codec=codec)
    started = time.perf_counter()
    count = sum(len(d.meta) + d.skipped.get("face", 0) for d in _decoded(_batches(source.rows(), batch), decoder, workers))
    return count / (time.perf_counter() - started)


def time_gpu_decode(folder: Path, device: str, batch: int = 256) -> float | None:
    """nvJPEG through dino_demo.images.load_image_tensors, images/s; None without torchvision and CUDA."""
    from dino_demo.images import load_image_tensors, nvjpeg

    codec = nvjpeg(device)
    if codec is None:
        return None
    decoder = codec.decode
    files = [f.read_bytes() for f in sorted(folder.glob("*.jpg"))]
    load_image_tensors(files[:8], device, jpeg_decoder=decoder)  # warm-up: nvJPEG's handles
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(0, len(files), batch):
        load_image_tensors(files[i:i + batch], device, jpeg_decoder=decoder)
    torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - started)


def time_build(folder: Path, embedder, workers: int, batch: int, skip_faces: bool = False,
               backend: str = "auto", decode: str = "auto") -> float:
    from index_builder.build import BuildOptions, build_index
    from index_builder.source import open_source

    with tempfile.TemporaryDirectory() as out:
        options = BuildOptions(batch_size=batch, workers=workers, skip_faces=skip_faces, thumb_size=0,
                               face_gate_backend=backend, decode=decode)
        report = build_index(open_source(str(folder)), embedder, out, options)
    return (report.indexed + report.skipped.get("face", 0)) / report.seconds


def time_gates(folder: Path, count: int, device: str) -> dict[str, float]:
    """Face gate ms per photo (all four turns, as a build checks) in this process: MediaPipe one photo at a
    time, the torch detector on the CPU in batches of 16, and on the GPU in one batch when there is one."""
    from dino_demo.face_torch import TorchFaceGate
    from dino_demo.faces import FaceGate

    photos = [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.jpg"))[:count]]
    gates = {"mediapipe (cpu)": (FaceGate(), 1), "torch (cpu)": (TorchFaceGate(device="cpu"), 16)}
    if device == "cuda":
        gates["torch (cuda)"] = (TorchFaceGate(device="cuda"), len(photos))
    times = {}
    for name, (gate, batch) in gates.items():
        gate.check_many(photos[:2])  # load the models outside the timing
        started = time.perf_counter()
        for i in range(0, len(photos), batch):
            gate.check_many(photos[i:i + batch])
        if "cuda" in name:
            torch.cuda.synchronize()
        times[name] = 1000 * (time.perf_counter() - started) / len(photos)
        gate.close()
    return times


def share(rate: float, limit: float) -> str:
    return f"{rate:9.1f} images/s = {100 * rate / limit:5.1f}% of the model's limit"


def main() -> None:
    from dino_demo.face_torch import BACKENDS, gate_factory
    from dino_demo.model import Embedder
    from index_builder.build import DECODERS, JPEG_DATA, jpeg_codec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=256, help="images for the decode and build runs")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seconds", type=float, default=10.0, help="time per model measurement")
    p.add_argument("--batches", default="1,32", help="model batch sizes to time")
    p.add_argument("--face-gate-backend", default="auto", choices=BACKENDS, help="the builder's face gate")
    p.add_argument("--decode", default="auto", choices=DECODERS, help="where the builds decode JPEGs")
    p.add_argument("--layers", type=int, default=12, help="transformer layers (12: ViT-S/16; fewer for a quick run)")
    p.add_argument("--gate-photos", type=int, default=32, help="photos for the face gate's time per photo")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_vits16(Path(tmp) / "vits16", args.layers)
        images = write_jpegs(Path(tmp) / "images", args.images)
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-S/16 with {args.layers} layers")
        device = Embedder(str(model_dir), device=args.device).device
        model_rates = []
        for bf16 in ([False, True] if device == "cuda" else [False]):
            embedder = Embedder(str(model_dir), device=args.device, bf16=bf16)
            for batch in (int(b) for b in args.batches.split(",")):
                rate = time_model(embedder, batch, args.seconds)
                model_rates.append(rate)
                print(f"model  {embedder.device:5s} {'bf16' if bf16 else 'fp32'} batch {batch:4d}: "
                      f"{rate:9.1f} images/s  ({1000 / rate:.1f} ms/image)")
        limit = max(model_rates)
        batch = max(int(b) for b in args.batches.split(","))
        print(f"model limit (best above): {limit:9.1f} images/s")
        print(f"decode+resize, {args.workers} CPU workers:        {share(time_decode(images, args.workers), limit)}")
        gpu_decode = time_gpu_decode(images, device)
        print(f"decode, nvJPEG on {device}:                    " +
              (share(gpu_decode, limit) if gpu_decode else "  not run (needs torchvision and CUDA)"))
        gate = gate_factory(args.face_gate_backend, device)
        name = getattr(gate, "func", gate).__name__
        gated = time_decode(images, args.workers, gate, batch)
        print(f"decode+resize+face gate ({name}), {args.workers} workers: {share(gated, limit)}")
        if codec := jpeg_codec("auto", device, JPEG_DATA):  # the builder's own GPU path, workers and all
            rate = time_decode(images, args.workers, None, batch, codec)
            print(f"decode+resize, nvJPEG, {args.workers} workers:        {share(rate, limit)}")
            rate = time_decode(images, args.workers, gate, batch, codec)
            print(f"decode+resize+face gate ({name}), nvJPEG, {args.workers} workers: {share(rate, limit)}")
        decode = f"--decode {args.decode}"
        build = time_build(images, embedder, args.workers, batch, decode=args.decode)
        print(f"build, face gate off, {decode}, batch {batch}:            {share(build, limit)}")
        build = time_build(images, embedder, args.workers, batch, True, args.face_gate_backend, args.decode)
        print(f"build, face gate on ({name}), {decode}, batch {batch}: {share(build, limit)}")
        for gate_name, ms in time_gates(images, args.gate_photos, device).items():
            print(f"face gate {gate_name:16s}: {ms:7.1f} ms per photo (all four turns)")


if __name__ == "__main__":
    main()
