"""Pictures for people: a hit's matching region boxed, similarity heat maps, patch-match lines, and what
DINO sees (attention maps, its object mask, feature colours).

Lines are drawn at twice the size and shrunk, which anti-aliases them (PIL draws jagged lines
otherwise); a box's outline is blended by the share of each pixel it covers.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .attention import pixel_mask
from .geometry import Box
from .images import REDUCING_GAP, THUMBNAIL_GAP, as_rgb, thumbnail_size
from .matching import MATCH_LINES, Matches

Colour = tuple[int, int, int]
BOX_COLOUR: Colour = (255, 214, 0)  # bright yellow, with a dark edge so it shows on any photo
EDGE_COLOUR: Colour = (20, 20, 20)
SUPERSAMPLE = 2
MATCH_HEIGHT = 384  # the side-by-side patch-matching picture's height, at most


def draw_box(
    image: Image.Image,
    box,
    original_size: tuple[int, int] | None = None,
    colour: Colour = BOX_COLOUR,
    width: int = 3,
) -> Image.Image:
    """A copy of `image` with `box` outlined; the box is in `original_size` pixels (default: the image's).

    The outline is anti-aliased by the share of each pixel it covers, computed exactly (an axis-aligned
    ring's coverage is a product of two 1-D overlaps), so the photo's own pixels are left as they are."""
    if original_size is not None:
        box = Box(*box).scaled(original_size, image.size)
    x0, y0, x1, y1 = (float(v) for v in box)
    w = max(1, width)
    out = image.convert("RGB")  # a copy, even of an RGB image
    # A 1-pixel dark rim on both sides keeps yellow visible on pale photos. Only pixels within the
    # outline's outer edge can change, so coverage is computed over that rectangle, not the picture.
    for grow, shrink, paint in ((1, w + 1, EDGE_COLOUR), (0, w, colour)):
        outer = (x0 - grow, y0 - grow, x1 + grow, y1 + grow)
        area = (max(0, math.floor(outer[0])), max(0, math.floor(outer[1])),
                min(image.width, math.ceil(outer[2])), min(image.height, math.ceil(outer[3])))
        if area[2] <= area[0] or area[3] <= area[1]:
            continue
        ring = _coverage(area, outer) - _coverage(area, (x0 + shrink, y0 + shrink, x1 - shrink, y1 - shrink))
        out.paste(paint, area, mask=Image.fromarray((ring * 255).round().astype(np.uint8)))
    return out


def _coverage(area: tuple[int, int, int, int], rect: tuple[float, float, float, float]) -> np.ndarray:
    """Share of each pixel of `area` (left, top, right, bottom) inside `rect` (x0, y0, x1, y1 in pixel
    edges; empty if inverted), as an array of the area's (h, w)."""
    def overlap(first: int, end: int, lo: float, hi: float) -> np.ndarray:
        edges = np.arange(first, end, dtype=np.float32)
        return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0, 1)
    return np.outer(overlap(area[1], area[3], rect[1], rect[3]), overlap(area[0], area[2], rect[0], rect[2]))


def draw_heatmap(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> Image.Image:
    """`image` with a (gh, gw) similarity map laid over it, upsampled smoothly and coloured by `cmap`."""
    from matplotlib import colormaps

    values = np.asarray(heat, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    smooth = Image.fromarray(values, mode="F").resize(image.size, Image.Resampling.BICUBIC)
    levels = np.clip(np.asarray(smooth), 0.0, 1.0)  # (h, w) in 0..1
    colours = (colormaps[cmap](levels)[..., :3] * 255).astype(np.float32)
    # Strong matches get the full overlay, weak ones mostly show the photo.
    weight = (alpha * (0.35 + 0.65 * levels))[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - weight) + colours * weight).round().astype(np.uint8))


def draw_matches(
    img_a: Image.Image,
    img_b: Image.Image,
    matches: Matches,
    n: int = MATCH_LINES,
    height: int = MATCH_HEIGHT,
    gap: int = 12,
    cmap: str = "turbo",
) -> Image.Image:
    """A and B side by side at the same height, the `n` strongest matches joined by lines.

    Colours run from red (strongest) to blue (weakest); the box on A, if any, is outlined.
    """

    shown = matches.top(n)
    sa, sb = height / img_a.height, height / img_b.height
    wa, wb = round(img_a.width * sa), round(img_b.width * sb)
    canvas = Image.new("RGB", (wa + gap + wb, height), (255, 255, 255))
    for image, width, x in ((img_a, wa, 0), (img_b, wb, wa + gap)):
        canvas.paste(as_rgb(image).resize((width, height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP), (x, 0))
    # Lines, dots and the box go on a transparent layer at twice the size, shrunk onto the photos.
    s = SUPERSAMPLE
    layer = Image.new("RGBA", (canvas.width * s, height * s), (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    if matches.box is not None:
        x0, y0, x1, y1 = Box(*matches.box).scaled(img_a.size, (wa * s, height * s))
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=3 * s)
    count = len(shown)
    colours = match_colours(count, cmap)
    dot = 5 * s
    for rank in reversed(range(count)):  # weakest first, so the strongest lie on top
        colour = colours[rank]
        ax, ay = shown.points_a[rank] * sa * s
        bx, by = shown.points_b[rank] * sb * s
        bx += (wa + gap) * s
        pen.line((ax, ay, bx, by), fill=EDGE_COLOUR, width=4 * s)  # dark halo: lines show on any colour
        pen.line((ax, ay, bx, by), fill=colour, width=2 * s)
        for x, y in ((ax, ay), (bx, by)):
            pen.ellipse((x - dot, y - dot, x + dot, y + dot), fill=colour, outline=(255, 255, 255), width=s)
    # Each pixel the mean of its 2x2 block, averaged with alpha premultiplied (no dark fringes), then laid on.
    layer = layer.convert("RGBa").reduce(s).convert("RGBA")
    canvas.paste(layer, (0, 0), layer)
    return canvas


def match_colours(count: int, cmap: str = "turbo") -> list[Colour]:
    """Colour of each match rank: red for the strongest through to blue for the weakest."""
    from matplotlib import colormaps

    levels = 0.95 - 0.85 * np.arange(count) / max(1, count - 1)
    return [tuple(int(c * 255) for c in rgba[:3]) for rgba in colormaps[cmap](levels)]


def draw_placeholder(size: tuple[int, int], colour: Colour = (200, 200, 200)) -> Image.Image:
    """A plain tile for an indexed image that has no stored thumbnail."""
    return Image.new("RGB", size, colour)


# --- what DINO sees ------------------------------------------------------------------------------

TILE = 168  # side of each small attention map
DIMMED = 0.3  # brightness left to what lies outside the mask


def shrunk(image: Image.Image, side: int) -> Image.Image:
    """A copy no larger than `side` on its longer side: pictures are drawn at the size they are shown."""
    rgb, size = as_rgb(image), thumbnail_size(image.size, side)
    return rgb.copy() if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=THUMBNAIL_GAP)


def draw_attention_maps(image: Image.Image, heads: np.ndarray, columns: int = 4) -> Image.Image:
    """A grid of small pictures: the photo, the heads' mean attention, then each head's (`heads`: (h, gh, gw))."""
    small = shrunk(image, TILE)
    tiles = [(small, "photo"), (draw_heatmap(small, heads.mean(axis=0), alpha=0.85), "mean of heads")]
    tiles += [(draw_heatmap(small, head, alpha=0.85), f"head {i + 1}") for i, head in enumerate(heads)]
    rows = -(-len(tiles) // columns)
    gap = 6
    sheet = Image.new("RGB", (columns * (TILE + gap) - gap, rows * (TILE + gap) - gap), (255, 255, 255))
    pen, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=13)
    for i, (tile, label) in enumerate(tiles):
        x, y = (i % columns) * (TILE + gap), (i // columns) * (TILE + gap)
        sheet.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
        at = (x + 4, y + TILE - 18)  # bottom left: a viewer's own label covers the top left
        left, top, right, bottom = pen.textbbox(at, label, font=font)
        pen.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=EDGE_COLOUR)
        pen.text(at, label, fill=(255, 255, 255), font=font)
    return sheet


def draw_mask(image: Image.Image, cells: np.ndarray, colour: Colour = BOX_COLOUR) -> Image.Image:
    """`image` with what lies outside a (gh, gw) cell mask dimmed and the mask's edge outlined."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    inside = pixel_mask(cells, image.size)  # (h, w)
    out = np.where(inside[..., None], base, base * DIMMED)
    edge = np.zeros_like(inside)
    edge[:-1] |= inside[:-1] != inside[1:]
    edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
    width = max(1, round(max(image.size) / 300))
    for _ in range(width):  # thicken the one-pixel edge
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    out[edge] = colour
    return Image.fromarray(out.round().astype(np.uint8))


def draw_colours(image: Image.Image, colours: np.ndarray, foreground: np.ndarray) -> Image.Image:
    """(gh, gw, 3) feature colours laid smoothly over `image` where `foreground` (gh, gw) holds; elsewhere
    the photo in dimmed grey."""
    paint = Image.fromarray((colours * 255).round().astype(np.uint8)).resize(image.size, Image.Resampling.BICUBIC)
    alpha = Image.fromarray(foreground.astype(np.float32), mode="F").resize(image.size, Image.Resampling.BILINEAR)
    weight = np.clip(np.asarray(alpha), 0.0, 1.0)[..., None]
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] * DIMMED
    out = weight * np.asarray(paint, dtype=np.float32) + (1 - weight) * grey
    return Image.fromarray(out.round().astype(np.uint8))


def side_by_side(pictures: list[Image.Image], height: int, gap: int = 12) -> Image.Image:
    """The pictures in a row, each scaled to `height`, on white."""
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height), Image.Resampling.BICUBIC)
              for p in pictures]
    row = Image.new("RGB", (sum(p.width for p in scaled) + gap * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for p in scaled:
        row.paste(p, (x, 0))
        x += p.width + gap
    return row
