"""Latency of each API endpoint through gradio_client, on the default collection, split by step.

Uses a ViT-S/16-sized model with random weights (same compute as facebook/dino-vits16 at 224 px),
so it runs offline. Prints p50 / p95 in ms of: load (decode + face gate), embed, search, draw,
total (inside the engine) and round trip (client to client, with uploads and the queue).

    python benchmarks/latency.py [--runs 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)
COLLECTION = ROOT / "assets" / "collection"
STEPS = ("load", "embed", "search", "draw", "total", "round_trip")



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: Path, cache: Path, device: str) -> str:
    from dino_demo.config import Settings
    from app import open_engine
    from dino_demo.ui import build_ui, launch_options

    settings = Settings(model=str(model), device=device, cache_dir=cache, host="127.0.0.1", port=free_port())
    started = time.perf_counter()
    engine = open_engine(settings)
    print(f"model + default index ({engine.index.count} images) ready in {time.perf_counter() - started:.1f}s",
          file=sys.stderr)
    build_ui(engine, settings).launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    return f"http://127.0.0.1:{settings.port}/"


def calls(client, handle_file) -> dict:
    """One call per endpoint, cycling through the collection so no two calls in a row are the same."""
    files = sorted(COLLECTION.glob("*.jpg"))
    pick = lambda i: handle_file(str(files[i % len(files)]))  # noqa: E731
    return {
        "/search_image": lambda i: client.predict(pick(i), 8, api_name="/search_image")[1],
        "/search_region": lambda i: client.predict(pick(i), 100, 60, 300, 260, 8, False, api_name="/search_region")[1],
        "/match_patches": lambda i: client.predict(pick(i), pick(i + 1), None, None, None, None, 50,
                                                   api_name="/match_patches")[2],
    }


def measure(call, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    call(0)  # warm-up: first-call allocations, MediaPipe graph loading
    for i in range(1, runs + 1):
        started = time.perf_counter()
        result = call(i)
        times["round_trip"].append((time.perf_counter() - started) * 1000)
        for step, ms in result["timings_ms"].items():
            times[step].append(ms)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory() as tmp:
        url = start_app(save_vits16(Path(tmp) / "vit-small-patch16-random"), Path(tmp) / "cache", args.device)
        client = Client(url, verbose=False, download_files=False)
        print(f"{args.runs} calls per endpoint, torch {torch.__version__} on {args.device}, "
              f"{torch.get_num_threads()} threads; ms as p50 / p95")
        print(f"{'endpoint':<16}" + "".join(f"{step:>16}" for step in STEPS))
        for endpoint, call in calls(client, handle_file).items():
            times = measure(call, args.runs)
            cells = [f"{np.percentile(v, 50):7.1f} /{np.percentile(v, 95):7.1f}" if v else f"{'-':>15}"
                     for v in (times[s] for s in STEPS)]
            print(f"{endpoint:<16}" + "".join(f"{c:>16}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
