"""Run the DINO image search demo: `python app.py [--index DIR | hf://USER/REPO] [--model M] ...`.

Settings come from DINO_* environment variables (what a Hugging Face Space sets), then these options.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dino_demo.config import ENV_VARS, Settings
from dino_demo.errors import UserError
from dino_demo.onnx_backend import BACKENDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DINO image search: similar images, similar regions and matching patches.",
        epilog="Environment: " + "; ".join(f"{var}: {what}" for var, what in ENV_VARS.values()),
    )
    p.add_argument("--index", help="index folder or hf://USER/REPO (default: index the bundled collection once)")
    p.add_argument("--model", help="hub id or local folder of the DINO / DINOv2 backbone")
    p.add_argument("--device", help="auto, cpu, cuda or mps")
    p.add_argument("--backend", choices=BACKENDS,
                   help="how the CPU embeds queries: auto (ONNX Runtime int8, else torch), torch, onnx, onnx-int8")
    p.add_argument("--input-size", type=int, help="model input side in pixels (default: the model's)")
    p.add_argument("--k", type=int, help="results shown by default")
    p.add_argument("--host", help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, help="port to listen on (default 7860)")
    p.add_argument("--share", action="store_true", default=None, help="make a temporary public gradio.live link")
    p.add_argument("--allow-faces", action="store_true", help="accept photos of people (the face gate is on by default)")
    p.add_argument("--cache-dir", type=Path, help="where the bundled collection's index is built")
    return p


def load_settings(argv: list[str] | None, environ) -> Settings:
    """Environment first, then the command line on top."""
    args = build_parser().parse_args(argv)
    settings = Settings.from_env(environ).with_overrides(
        index=args.index, model=args.model, device=args.device, backend=args.backend,
        input_size=args.input_size, k=args.k,
        host=args.host, port=args.port, share=args.share, cache_dir=args.cache_dir,
    )
    return settings.with_overrides(face_gate=False) if args.allow_faces else settings


def print_build_progress():
    """A tqdm bar for the one-off indexing of the bundled collection."""
    from tqdm import tqdm

    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            print("indexing the bundled collection once (later starts reuse it)", file=sys.stderr)
            bar = tqdm(total=total or None, unit="img", desc="indexing")
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return report


def make_demo(settings: Settings):
    """The ready-to-launch Blocks app for these settings (loads the model and the index)."""
    from dino_demo.engine import Engine
    from dino_demo.ui import build_ui

    engine = Engine.open(settings, progress=print_build_progress())
    return build_ui(engine, settings)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, os.environ)
        demo = make_demo(settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dino_demo.ui import launch_options

    demo.launch(**launch_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
