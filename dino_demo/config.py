"""The app's settings, each declared once: its default, environment variable and help text live on its field.

From that one declaration come the command-line options (`add_arguments`), the DINO_* variables a Hugging
Face Space sets (`Settings.from_env`) and the README's table (`env_table`; a test keeps the README equal
to it, and `python -m dino_demo.config` prints it). The edge (app.py) reads argv and the environment; the
core takes a `Settings` or plain values. Importing this module loads neither torch nor gradio.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .backbones import DEFAULT_MODEL
from .errors import UserError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_COLLECTION = ROOT / "assets" / "collection"  # the shipped photos: examples, and the default index
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dino-demo"  # the XDG rule
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")  # how a CPU runs the model (onnx_backend.py)


class SettingsError(UserError):
    """An environment variable or option with a value that cannot be used."""


def setting(default: Any = None, help: str = "", env: str | None = None, *, choices: tuple | None = None,
            shown: str | None = None, alias: tuple[str, Any] | None = None, minimum: int = 1, factory=None) -> Field:
    """A dataclass field that also says how a person sets it: `env` variable, `help` text, allowed
    `choices`, the smallest whole number allowed, the default as `shown` to people, and an extra
    command-line `alias` (flag, value)."""
    meta = {"help": help, "env": env, "choices": choices, "shown": shown, "alias": alias, "minimum": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything the app can be told; defaults suit a 2-core CPU box such as a free Space."""

    model: str | None = setting(None, "hub id or local folder of the backbone", "DINO_MODEL",
                                shown=f"the one the index was built with; {DEFAULT_MODEL} for the bundled collection")
    index: str | None = setting(None, "index folder or hf://USER/REPO", "DINO_INDEX",
                                shown="unset: the bundled collection, indexed once")
    watch: int = setting(2, "seconds between looks at the index folder: an add, remove or compact is served "
                         "without a restart (0: never look)", "DINO_WATCH", minimum=0)
    k: int = setting(8, "results shown by default", "DINO_K")
    max_k: int = setting(50, "the most results one query may ask for", "DINO_MAX_K")
    device: str = setting("auto", "auto, cpu, cuda or mps", "DINO_DEVICE")
    backend: str = setting("auto", "how a CPU runs the model: auto (ONNX Runtime with int8 weights, else "
                           "torch), torch, onnx or onnx-int8", "DINO_BACKEND", choices=BACKENDS)
    input_size: int | None = setting(None, "model input side in pixels, a multiple of the patch size",
                                     "DINO_INPUT_SIZE", shown="the index's; the model's own for the bundled collection")
    match_input_size: int | None = setting(
        None, "model input side for patch matching and co-segmentation, which use no index: 448 gives 4x the "
        "patches of 224 and takes 5-6x as long", "DINO_MATCH_INPUT_SIZE", shown="the index's")
    max_upload_bytes: int = setting(DEFAULT_MAX_BYTES, "largest accepted upload in bytes", "DINO_MAX_UPLOAD_BYTES",
                                    shown="25 MiB")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "largest accepted image in pixels (width × height)",
                              "DINO_MAX_PIXELS", shown="52 million")
    video_seconds: int = setting(10, "longest clip accepted by What DINO sees, in seconds", "DINO_VIDEO_SECONDS")
    video_fps: int = setting(8, "frames of a clip analysed per second of it", "DINO_VIDEO_FPS")
    video_frames: int = setting(80, "the most frames of one clip analysed", "DINO_VIDEO_FRAMES")
    video_pixels: int = setting(2_100_000, "largest accepted clip frame in pixels (width × height)", "DINO_VIDEO_PIXELS",
                                shown="2.1 million (Full HD)")
    queue_size: int = setting(16, "requests that may wait; more are told the app is busy", "DINO_QUEUE_SIZE")
    concurrency: int = setting(1, "requests served at once (on 2 cores more only makes each slower)",
                               "DINO_CONCURRENCY")
    face_gate: bool = setting(True, "refuse photos of people", "DINO_FACE_GATE", alias=("--allow-faces", False))
    upload_lifetime: int = setting(3600, "seconds an upload or result picture is kept on disk", "DINO_UPLOAD_LIFETIME")
    host: str | None = setting(None, "address to listen on (0.0.0.0 to serve other machines or in a container)",
                               "DINO_HOST", shown="127.0.0.1, or GRADIO_SERVER_NAME")
    port: int = setting(7860, "port to listen on", "DINO_PORT")
    share: bool = setting(False, "make a temporary public gradio.live link", "DINO_SHARE")
    cache_dir: Path = setting(help="where the bundled collection's index and the ONNX exports are kept",
                              env="DINO_CACHE_DIR", factory=lambda: DEFAULT_CACHE_DIR, shown="~/.cache/dino-demo ($XDG_CACHE_HOME/dino-demo if set)")
    collection: Path = setting(BUNDLED_COLLECTION, "image folder indexed when no index is given",
                               "DINO_COLLECTION", shown="assets/collection")

    def __post_init__(self):
        if not 1 <= self.k <= self.max_k:
            raise SettingsError(f"The default number of results ({self.k}) must be between 1 and {self.max_k}.")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingsError(f"Unknown {f.name} '{getattr(self, f.name)}': use one of {', '.join(choices)}.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Settings":
        """Settings with each DINO_* variable that is set (and not empty) applied over the defaults."""
        values = {}
        for f in fields(cls):
            var = f.metadata.get("env")
            raw = environ.get(var, "").strip() if var else ""
            if raw:
                values[f.name] = convert(f, raw, var)
        if "host" not in values and environ.get("GRADIO_SERVER_NAME"):
            values["host"] = environ["GRADIO_SERVER_NAME"]
        return cls(**values)

    def with_overrides(self, **changes) -> "Settings":
        """A copy with the changes whose value is not None (unset command-line options)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def convert(f: Field, raw: str, where: str):
    """The value of field `f` written as `raw` in `where` (a variable or an option), or SettingsError."""
    kind = str(f.type)
    if "bool" in kind:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise SettingsError(f"{where}={raw!r}: use 1 or 0.")
    if kind.startswith("int"):
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{where}={raw!r} is not a whole number.") from None
        if value < f.metadata.get("minimum", 1):
            raise SettingsError(f"{where}={raw!r} must be at least {f.metadata.get('minimum', 1)}.")
        return value
    if kind.startswith("Path"):
        return Path(raw).expanduser()
    return raw


def option_name(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, options_class, only: tuple[str, ...] | None = None) -> None:
    """One command-line option per field of the dataclass `options_class` (or the fields named in
    `only`), unset (None) unless given."""
    for f in fields(options_class):
        if only is not None and f.name not in only:
            continue
        meta, flag = f.metadata, option_name(f)
        text = f"{meta.get('help', '')} (default: {shown_default(f)}"
        text += f"; env {meta['env']})" if meta.get("env") else ")"
        if "bool" in str(f.type):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text.replace("%", "%%"))
            if meta.get("alias"):
                alias, value = meta["alias"]
                parser.add_argument(alias, dest=f.name, action="store_const", const=value,
                                    help=f"same as {flag if value else '--no-' + flag[2:]}")
            continue
        parser.add_argument(flag, dest=f.name, default=None, choices=meta.get("choices"),
                            type=_argument_type(f, flag), help=text.replace("%", "%%"))


def _argument_type(f: Field, flag: str):
    def parse(raw: str):
        try:
            return convert(f, raw, flag)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = str(f.type)  # argparse names the type in "invalid ... value"
    return parse


def shown_default(f: Field) -> str:
    """The default as people should read it."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    value = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def _options_text(f: Field) -> str:
    flag = option_name(f)
    if "bool" not in str(f.type):
        return f"`{flag}`"
    alias = f" (`{f.metadata['alias'][0]}`)" if f.metadata.get("alias") else ""
    return f"`{flag}`, `--no-{flag[2:]}`{alias}"


def env_table() -> str:
    """The README's table of environment variables, made from `Settings`."""
    rows = ["| variable | option | meaning | default |", "|---|---|---|---|"]
    for f in fields(Settings):
        if f.metadata.get("env"):
            meaning = f.metadata["help"] + (" (`1` or `0`)" if "bool" in str(f.type) else "")
            rows.append(f"| `{f.metadata['env']}` | {_options_text(f)} | {meaning} | {shown_default(f)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(env_table())
