"""Run the DINO image search demo: `python app.py [--index DIR | hf://USER/REPO] [--model M] ...`.

Settings come from DINO_* environment variables (what a Hugging Face Space sets), then these options;
both are made from `dino_demo.config.Settings`, where each setting is declared once.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from dino_demo.config import Settings, add_arguments
from dino_demo.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DINO image search: similar images, similar regions and matching patches. "
        "Every option can also be set by the environment variable named in its help.",
    )
    add_arguments(p, Settings)
    return p


def load_settings(argv: list[str] | None, environ) -> Settings:
    """Environment first, then the command line on top."""
    args = build_parser().parse_args(argv)
    return Settings.from_env(environ).with_overrides(**vars(args))


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


def open_engine(settings: Settings, progress=None, gate=None):
    """An Engine over the index the settings name (a folder or hf://USER/REPO) with the model it was built
    with (unless --model says otherwise), or over the bundled collection, indexed once with the default."""
    from dino_demo.engine import Engine, load_embedder
    from dino_demo.index import load_index, read_manifest
    from dino_demo.live_index import LiveIndex
    from index_builder.locate import build_default_index, locate_index

    if settings.index is None:
        embedder = load_embedder(settings)
        folder = build_default_index(embedder, settings.cache_dir, settings.collection,
                                     skip_faces=settings.face_gate, progress=progress)
    else:
        folder = locate_index(settings.index)
        embedder = load_embedder(settings, read_manifest(folder)["model"])
    model = embedder.describe()
    return Engine.from_settings(settings, embedder, LiveIndex(load_index(folder, model), model, settings.watch), gate)


def start_line(engine, settings: Settings, url: str, share_url: str | None) -> str:
    """The one line the app prints when it is ready: where, what it serves, and with which gate."""
    from dino_demo.backbones import short_name

    model = f"{short_name(engine.embedder.model_id)} on {engine.embedder.device} ({engine.embedder.backend})"
    if (match := engine.match_embedder).input_size != engine.embedder.input_size:
        model += f", {engine.embedder.input_size} px for search and {match.input_size} px for matching"
    public = f"; public link {share_url}" if share_url else "; --share makes a public gradio.live link"
    return (f"DINO image search at {url} · {engine.index.count} images · {model} · "
            f"face gate {'on' if settings.face_gate else 'off'}{public}")


def warm_up(engine) -> None:
    """`engine.warm_up()`; should it fail, one line, and the requests make what they need as before."""
    try:
        engine.warm_up()
    except Exception as e:  # noqa: BLE001  (the server carries on; a request meets the same fault with its message)
        print(f"warning: warming up failed ({type(e).__name__}: {e}); the first requests will take longer",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, os.environ)
        engine = open_engine(settings, progress=print_build_progress())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dino_demo.ui import build_ui, launch_options

    demo = build_ui(engine, settings)
    demo.launch(**launch_options(settings, engine), quiet=True, prevent_thread_lock=True)  # our own start line instead
    # What the first requests would otherwise make (the gate's detectors, the attention export) is made
    # while the first person opens the page and picks a photo.
    threading.Thread(target=warm_up, args=(engine,), name="warm-up", daemon=True).start()
    print(start_line(engine, settings, demo.local_url, demo.share_url), flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
