"""The app's settings in one dataclass, read from the environment at the edge (app.py), never by the core.

A Hugging Face Space sets its index and model as variables (DINO_INDEX, DINO_MODEL, ...); the command
line overrides them. See `ENV_VARS` for the full list.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

from .errors import UserError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .model import DEFAULT_MODEL
from .onnx_backend import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COLLECTION = ROOT / "assets" / "collection"


class SettingsError(UserError):
    """An environment variable or option with a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything the app can be told; defaults suit a 2-core CPU box such as a free Space."""

    model: str = DEFAULT_MODEL  # hub id or local folder
    index: str | None = None  # index folder, hf://USER/REPO (a dataset repo), or None: the default collection
    k: int = 8  # results shown by default
    max_k: int = 50  # the most results one query may ask for
    device: str = "auto"
    backend: str = "auto"  # query embedding on a CPU: ONNX Runtime int8 when it loads, else torch
    input_size: int | None = None  # model input side in pixels; None: the model's own
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    queue_size: int = 16  # waiting requests beyond this get a "busy, try again" message
    concurrency: int = 1  # requests run at once; on 2 cores more only makes each slower
    face_gate: bool = True  # refuse photos of people (--allow-faces turns it off)
    upload_lifetime: int = 3600  # seconds an upload or result picture stays on disk before it is deleted
    host: str | None = None  # None: Gradio's default (127.0.0.1, or GRADIO_SERVER_NAME)
    port: int = 7860
    share: bool = False
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "dino-demo")
    collection: Path = DEFAULT_COLLECTION  # indexed once per model when no index is given

    def __post_init__(self):
        if not 1 <= self.k <= self.max_k:
            raise SettingsError(f"The default number of results ({self.k}) must be between 1 and {self.max_k}.")
        if self.backend not in BACKENDS:
            raise SettingsError(f"Unknown backend '{self.backend}': use one of {', '.join(BACKENDS)}.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Settings":
        """Settings with each DINO_* variable that is set (and not empty) applied over the defaults."""
        values = {}
        for name, (var, _) in ENV_VARS.items():
            raw = environ.get(var, "").strip()
            if raw:
                values[name] = _parse(name, var, raw)
        if "host" not in values and environ.get("GRADIO_SERVER_NAME"):
            values["host"] = environ["GRADIO_SERVER_NAME"]
        return cls(**values)

    def with_overrides(self, **changes) -> "Settings":
        """A copy with the changes whose value is not None (unset command-line options)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# field -> (environment variable, what it means); the README lists these.
ENV_VARS: dict[str, tuple[str, str]] = {
    "model": ("DINO_MODEL", "hub id or local folder of the backbone"),
    "index": ("DINO_INDEX", "index folder or hf://USER/REPO; unset: index the default collection"),
    "k": ("DINO_K", "results shown by default"),
    "max_k": ("DINO_MAX_K", "the most results a query may ask for"),
    "device": ("DINO_DEVICE", "auto, cpu, cuda or mps"),
    "backend": ("DINO_BACKEND", "auto (ONNX Runtime int8 on a CPU, else torch), torch, onnx or onnx-int8"),
    "input_size": ("DINO_INPUT_SIZE", "model input side in pixels (a multiple of the patch size)"),
    "max_upload_bytes": ("DINO_MAX_UPLOAD_BYTES", "largest accepted upload in bytes"),
    "max_pixels": ("DINO_MAX_PIXELS", "largest accepted image in pixels (width x height)"),
    "queue_size": ("DINO_QUEUE_SIZE", "requests that may wait; more get a busy message"),
    "concurrency": ("DINO_CONCURRENCY", "requests served at once"),
    "face_gate": ("DINO_FACE_GATE", "1 (default) refuses photos of people; 0 accepts them"),
    "upload_lifetime": ("DINO_UPLOAD_LIFETIME", "seconds an upload or result picture is kept on disk"),
    "host": ("DINO_HOST", "address to listen on (0.0.0.0 in a container)"),
    "port": ("DINO_PORT", "port to listen on"),
    "share": ("DINO_SHARE", "1 makes a temporary public gradio.live link"),
    "cache_dir": ("DINO_CACHE_DIR", "where the default collection's index is built"),
    "collection": ("DINO_COLLECTION", "image folder indexed when no index is given"),
}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse(name: str, var: str, raw: str):
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if "bool" in kind:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise SettingsError(f"{var}={raw!r}: use 1 or 0.")
    if kind.startswith("int"):
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a whole number.") from None
        if value < 1:
            raise SettingsError(f"{var}={raw!r} must be at least 1.")
        return value
    if kind == "Path":
        return Path(raw).expanduser()
    return raw
