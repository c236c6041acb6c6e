"""Transformed copies of an image, Copydays-style, for measuring copy detection on any collection.

Each transform takes an RGB image and a random generator and returns a new RGB image; strengths
are drawn per copy so a suite covers mild and strong edits. "exact" is the identity: an index
that cannot find an original from its exact copy at rank 1 is broken.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


@dataclass
class Copy:
    transform: str
    image: Image.Image


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    side = rng.uniform(0.5, 0.8)  # keep 25% to 64% of the area
    cw, ch = max(1, int(w * side)), max(1, int(h * side))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch))


def _scale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor = rng.uniform(0.3, 0.6)
    w, h = image.size
    return image.resize((max(8, int(w * factor)), max(8, int(h * factor))), Image.Resampling.BILINEAR)


def _rotation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.6, 1.4)))
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(10, 40))) % 256  # hue shift
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    radius = max(image.size) * float(rng.uniform(0.01, 0.02))
    return image.filter(ImageFilter.GaussianBlur(radius))


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(5, 20)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.copy()
    w, h = image.size
    size = max(8, h // 6)
    font = ImageFont.load_default(size=size)
    words = ["COPY", "sample", "© 2026", "watermark", "dino"]
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        xy = (int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - size))))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.text(xy, str(rng.choice(words)), fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def _strong(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Several edits at once, like Copydays' "strong" set."""
    for step in (_crop, _colour, _text, _jpeg):
        image = step(image, rng)
    return image


TRANSFORMS: dict[str, Transform] = {
    "exact": lambda image, rng: image.copy(),
    "crop": _crop,
    "flip": lambda image, rng: ImageOps.mirror(image),
    "scale": _scale,
    "rotation": _rotation,
    "colour": _colour,
    "blur": _blur,
    "jpeg": _jpeg,
    "text": _text,
    "strong": _strong,
}


def make_copies(image: Image.Image, seed: int, names: list[str] | None = None) -> list[Copy]:
    """One copy of `image` per transform (all by default); the same seed gives the same copies."""
    rng = np.random.default_rng(seed)
    image = image.convert("RGB")
    return [Copy(name, TRANSFORMS[name](image, rng).convert("RGB")) for name in names or list(TRANSFORMS)]
