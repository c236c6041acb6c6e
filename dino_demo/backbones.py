"""Which backbones the app knows, how each family is read, and how a model is named; free of torch so
`--help` stays fast.

One registry (FAMILIES) says per family what the code needs to know: extra keywords to load it and to
run it, whether its position embeddings are interpolated to other input sizes (DINO, DINOv2) or
rotary (DINOv3: any size), and its licence. Where patch tokens start is the same rule for all: after
the CLS token and the family's register tokens (`num_register_tokens` in its config: 4 for DINOv3 ViTs
and DINOv2 with registers, none for DINO and DINOv2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL = "facebook/dinov2-small"  # Apache-2.0 and not gated: a Space works without a token
DINOV3 = tuple(f"facebook/dinov3-{size}-pretrain-lvd1689m" for size in ("vits16", "vits16plus", "vitb16", "vitl16",
                                                                        "vith16plus", "vit7b16"))
KNOWN_MODELS = (
    "facebook/dinov2-small", "facebook/dinov2-base",
    "facebook/dinov2-with-registers-small", "facebook/dinov2-with-registers-base",
    "facebook/dino-vits16", "facebook/dino-vits8", "facebook/dino-vitb16", "facebook/dino-vitb8",
    *DINOV3, "facebook/dinov3-vitl16-pretrain-sat493m",
)
LARGE_PARAMETERS = 1_000_000_000  # beyond this many weights a model gets a memory warning (ViT-7B: 6.7 billion)


@dataclass(frozen=True)
class Family:
    """How one family of backbones is loaded and run."""

    name: str
    positions: str  # "interpolate": learned, resized to other inputs; "rotary": RoPE, any input size
    licence: str
    load: dict = field(default_factory=dict)  # extra from_pretrained() keywords
    forward: dict = field(default_factory=dict)  # extra forward() keywords
    artefacts: bool = False  # without registers, a few background patches draw much attention (Darcet et al., 2023)


FAMILIES = {  # by the model_type of the checkpoint's config.json
    "vit": Family("DINO", "interpolate", "Apache-2.0", {"add_pooling_layer": False}, {"interpolate_pos_encoding": True}),
    "dinov2": Family("DINOv2", "interpolate", "Apache-2.0", artefacts=True),
    "dinov2_with_registers": Family("DINOv2 with registers", "interpolate", "Apache-2.0"),
    "dinov3_vit": Family("DINOv3", "rotary", "DINOv3 License (gated: accept it on the model's page)"),
}
REFUSED = {  # families that load but have no patch grid to search or match
    "dinov3_convnext": "is a DINOv3 ConvNeXt, whose feature map is not a grid of patch tokens this app can search; "
                       "use a DINOv3 ViT such as facebook/dinov3-vits16-pretrain-lvd1689m",
}


def family_of(model_type: str, model_id: str) -> Family:
    """The family of a checkpoint's `model_type`, or a one-line refusal of one this app cannot use."""
    if model_type in REFUSED:
        raise UserError(f"{model_id} {REFUSED[model_type]}.")
    if model_type not in FAMILIES:
        raise UserError(f"{model_id} is a '{model_type}' model, not a DINO, DINOv2 or DINOv3 ViT; pass one of "
                        f"{', '.join(KNOWN_MODELS[:5])}, ... or a local folder of one.")
    return FAMILIES[model_type]


def prefix_tokens(config) -> int:
    """Tokens before the first patch token: the CLS token and the registers."""
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def short_name(model_id: str) -> str:
    """'facebook/dino-vits16' and a local folder '.../dino-vits16' both give 'dino-vits16'."""
    return Path(str(model_id).rstrip("/")).name or "model"


def describe_registers(model_type: str, registers: int) -> str:
    """The family and its registers, as the attention maps' caption: what a person should expect to see."""
    family = FAMILIES.get(model_type)
    name = family.name if family else model_type
    if registers:
        return f"{name}: {registers} registers, so the attention stays on the objects"
    if family and family.artefacts:
        return (f"{name} without registers: a few bright background patches that draw much of the attention "
                "are its known artefacts; a model with registers has none")
    return name
