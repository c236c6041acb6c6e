"""CPU a serving process burns after each kind of call: threads a library leaves spinning.

On a free 2-core Space every millisecond of CPU spent after an answer is taken from the next request,
the upload being prepared early and the client itself. For each engine call this prints the CPU time
of the whole process (all threads) in the 200 ms after it, while the calling thread sleeps; a quiet
process shows ~0. The engine is the app's (`app.open_engine`: ViT-S/16 with random weights, the real
face gate, the bundled collection), which runs BLAS on one thread (engine.blas_on_one_thread);
`--blas-threads N` gives BLAS N threads again afterwards, to see what that costs.

    python benchmarks/leftover_cpu.py [--blas-threads 2] [--calls 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vits16 import save_vits16  # noqa: E402  (benchmarks/ is on the path when run as a script)
COLLECTION = ROOT / "assets" / "collection"


def leftover_ms(call, calls: int) -> float:
    """p50 CPU ms of this process in the 200 ms after `call` returns."""
    call()  # warm-up
    burnt = []
    for _ in range(calls):
        call()
        started = time.process_time()
        time.sleep(0.2)
        burnt.append((time.process_time() - started) * 1000)
    return float(np.median(burnt))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blas-threads", type=int, help="give BLAS this many threads after the engine is made")
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    import threadpoolctl
    from PIL import Image

    from app import load_settings, open_engine

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(["--model", str(save_vits16(Path(tmp) / "model")), "--cache-dir",
                                  str(Path(tmp) / "cache")], {})
        engine = open_engine(settings)
        if args.blas_threads:
            threadpoolctl.threadpool_limits(args.blas_threads, user_api="blas")
        blas = sorted({lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"})
        a, b = (str(f) for f in sorted(COLLECTION.glob("*.jpg"))[:2])
        image = Image.open(a).convert("RGB")
        calls = {
            "nothing": lambda: None,
            "face gate": lambda: engine.gate.check(image),
            "embed": lambda: engine.embedder.embed([image]),
            "search_image": lambda: engine.search_image(a, 8),
            "search_region": lambda: engine.search_region(a, (100, 60, 300, 260), 8),
            "match": lambda: engine.match(a, b),
            "co_segment": lambda: engine.co_segment(a, b),
            "what_dino_sees": lambda: engine.what_dino_sees(a, 60),
        }
        print(f"BLAS threads {blas}; CPU ms of the process in the 200 ms after each call, p50 of {args.calls}")
        for name, call in calls.items():
            print(f"{name:<16}{leftover_ms(call, args.calls):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
