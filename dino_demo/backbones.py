"""Which backbones the app knows, and how a model is named; free of torch so `--help` stays fast."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "facebook/dinov2-small"
KNOWN_MODELS = (
    "facebook/dinov2-small", "facebook/dinov2-base",
    "facebook/dinov2-with-registers-small", "facebook/dinov2-with-registers-base",
    "facebook/dino-vits16", "facebook/dino-vits8", "facebook/dino-vitb16", "facebook/dino-vitb8",
)


def short_name(model_id: str) -> str:
    """'facebook/dino-vits16' and a local folder '.../dino-vits16' both give 'dino-vits16'."""
    return Path(str(model_id).rstrip("/")).name or "model"
