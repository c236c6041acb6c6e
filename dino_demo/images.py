"""The one place where bytes, paths and arrays become RGB PIL images.

Handles EXIF orientation, every common mode (palette, alpha, CMYK, 16-bit, float, grayscale),
animated files (first frame) and refuses decompression bombs before decoding pixels.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

if TYPE_CHECKING:  # torch only where tensors are asked for: the app's upload path never needs it here
    import torch

DEFAULT_MAX_PIXELS = 52_000_000  # a phone's 50-megapixel photo (8,160 x 6,144); larger is refused before decoding
DEFAULT_MAX_BYTES = 25 * 1024 * 1024
THUMB_SIDE = 256  # longer side of the thumbnails an index stores; result pictures are drawn at this size
THUMB_QUALITY = 80  # their JPEG quality
# A resize to under a third of the size first averages blocks by a whole factor (Pillow's reducing_gap),
# which Pillow documents as indistinguishable from resampling the whole: a phone's photo in a tenth of the time.
REDUCING_GAP = 3.0
THUMBNAIL_GAP = 2.0  # Image.thumbnail's own reducing_gap: shrink as thumbnail() does, without its copy

ImageSource = Union[bytes, bytearray, str, Path, np.ndarray, Image.Image, dict]

# PIL's own bomb check warns, then raises at twice its limit; ours runs first with a clear message.
Image.MAX_IMAGE_PIXELS = None


class ImageError(UserError):
    """An input that cannot be turned into an image; the message says why and what to do."""

    def __init__(self, message: str, reason: str = "unreadable image"):
        super().__init__(message)
        self.reason = reason  # a short name to count skipped rows by


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Return an RGB image from bytes, a file path, an array, a PIL image or a datasets image dict."""
    if isinstance(source, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
    if source is None:
        raise ImageError("No image was given.", reason="missing image")
    if isinstance(source, np.ndarray):
        source = _from_array(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return to_rgb(source)
    return to_rgb(_open(source, max_pixels, max_bytes))


def _open(source, max_pixels: int, max_bytes: int) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"No image file at {path}.")
        size = path.stat().st_size
        fp = path
    else:
        size = len(source)
        fp = io.BytesIO(source)
    if size == 0:
        raise ImageError("The file is empty; please upload an image (JPEG, PNG, WebP, GIF, ...).")
    if size > max_bytes:
        raise ImageError(
            f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. "
            "Please upload a smaller image.",
            reason="too large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(fp)
            _check_pixels(image.size, max_pixels)
            image.seek(0)  # animated images: the first frame
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            "This file is not an image Pillow can read; please upload a JPEG, PNG, WebP or GIF."
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"The image could not be decoded ({e}); it may be truncated or corrupt.") from None
    return image


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"The image has no pixels ({w}x{h}).")
    if w * h > max_pixels:
        raise ImageError(
            f"The image is {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is "
            f"{max_pixels / 1e6:.0f}. Please resize it first.",
            reason="too large",
        )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"An image array must be HxW, HxWx3 or HxWx4, not {array.shape}.")
    if array.dtype != np.uint8:
        array = _scale_to_uint8(array.astype(np.float64))
    return Image.fromarray(array)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch any numeric range (16-bit, float) to 0..255; a constant image becomes mid-grey."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if 0.0 <= lo and hi <= 1.0 and hi > 0:
        lo, hi = 0.0, 1.0  # floats in 0..1
    elif lo >= 0 and hi <= 65535 and hi > 255:
        lo, hi = 0.0, 65535.0  # 16-bit
    if hi <= lo:
        return np.full(values.shape, 128, np.uint8)
    scaled = (np.nan_to_num(values, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` itself when it is RGB already, else an RGB copy: for code that reads pixels and changes none."""
    return image if image.mode == "RGB" else image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB; transparency is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_scale_to_uint8(np.asarray(image, dtype=np.float64)))
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return as_rgb(image)


def content_hash(image: Image.Image | np.ndarray) -> str:
    """A hash of the decoded pixels (an RGB image, or its (h, w, 3) uint8 array): the same picture in
    another file or format (same pixels) hashes the same, so an exact copy is not indexed twice."""
    if isinstance(image, np.ndarray):
        mode, (h, w), data = "RGB", image.shape[:2], np.ascontiguousarray(image, np.uint8).tobytes()
    else:
        mode, (w, h), data = image.mode, image.size, image.tobytes()
    digest = hashlib.blake2b(f"{mode} {w}x{h}".encode(), digest_size=16)
    digest.update(data)
    return digest.hexdigest()


# The JPEG segments that do not change the decoded pixels: APP1-APP13 and APP15 (EXIF, XMP, ICC, Photoshop)
# and comments. APP0 (JFIF) and APP14 (Adobe: colour transform) can, and are kept.
_JPEG_METADATA = {*range(0xE1, 0xEE), 0xEF, 0xFE}


def jpeg_data_hash(data: bytes) -> str:
    """A hash of a JPEG's image data: its tables, frame and entropy-coded scans, not its metadata. Found
    without decoding, so a JPEG hashes the same whichever decoder reads it (PIL, nvJPEG); the same photo
    with other EXIF or comments hashes the same. A file whose markers do not parse is hashed whole."""
    digest = hashlib.blake2b(b"jpeg ", digest_size=16)
    at = 2  # after SOI
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xDA:  # start of scan: from here on image data to the end
            digest.update(data[at:])
            return digest.hexdigest()
        if marker not in _JPEG_METADATA:
            digest.update(data[at:at + 2 + length])
        at += 2 + length
    return hashlib.blake2b(b"jpeg file " + data, digest_size=16).hexdigest()


def make_thumbnail(image: Image.Image, max_side: int, quality: int = THUMB_QUALITY) -> bytes:
    """JPEG bytes of the image shrunk so its longer side is at most `max_side`."""
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


JpegDecoder = Callable[[list[bytes]], list["torch.Tensor"]]  # JPEG files -> (3, H, W) uint8 RGB each


class Nvjpeg:
    """torchvision's nvJPEG on a CUDA device: JPEG files decoded, and pictures encoded, a batch at a time."""

    def __init__(self, device: str):
        self.device = device

    def decode(self, files: list[bytes]) -> list[torch.Tensor]:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def encode(self, pictures: list[torch.Tensor], quality: int) -> list[bytes]:
        from torchvision.io import encode_jpeg

        return [bytes(out.cpu().numpy()) for out in encode_jpeg(pictures, quality=quality)]


def nvjpeg(device: str) -> Nvjpeg | None:
    """nvJPEG on a CUDA `device`; None without CUDA or without a torchvision that runs there (then every
    image takes the CPU path)."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
        import torchvision.io  # noqa: F401  (a CPU build of torch fails to load a CUDA torchvision: RuntimeError)
    except (ImportError, RuntimeError, OSError):
        return None
    return Nvjpeg(device) if torch.cuda.is_available() else None


def picture_size(picture: torch.Tensor) -> tuple[int, int]:
    """(w, h) of a (3, H, W) picture, as PIL's `size`."""
    return picture.shape[2], picture.shape[1]


def resize_picture(picture: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """A (3, H, W) uint8 picture resized to `size` (w, h) where it lies, antialiased as PIL resizes."""
    import torch

    if picture_size(picture) == tuple(size):
        return picture
    x = torch.nn.functional.interpolate(picture[None].float(), size=(size[1], size[0]), mode=mode, antialias=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def thumbnail_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) shrunk to fit `max_side` with its aspect kept; never enlarged."""
    w, h = size
    scale = max_side / max(w, h)
    return (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))


def load_image_tensors(sources: list[ImageSource], device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_bytes: int = DEFAULT_MAX_BYTES, jpeg_decoder: JpegDecoder | None = None,
                       plain: list[bytes | None] | None = None) -> list[torch.Tensor | ImageError]:
    """Each source as a (3, H, W) uint8 RGB tensor on `device`, or the ImageError saying why not.

    Plain upright RGB or grey JPEGs go to `jpeg_decoder` together (nvJPEG on a GPU: the CPU never decodes
    them); every other file, and any the decoder fails on, takes `load_image`'s path (EXIF turns, modes,
    limits, clear errors) and is then copied to the device. `plain`: each source's `plain_jpeg`, when the
    caller has it already."""
    import torch

    if plain is None:
        plain = [plain_jpeg(source, max_pixels, max_bytes) if jpeg_decoder else None for source in sources]
    files = plain if jpeg_decoder else [None] * len(sources)
    out: list = [None] * len(sources)
    batch = [i for i, f in enumerate(files) if f is not None]
    try:
        for i, tensor in zip(batch, jpeg_decoder([files[i] for i in batch]) if batch else []):
            out[i] = tensor
    except RuntimeError:  # one file nvJPEG cannot read fails the batch: all of it goes the CPU way
        out = [None] * len(sources)
    for i, source in enumerate(sources):
        if out[i] is None:
            try:
                rgb = np.asarray(load_image(source, max_pixels, max_bytes))
                out[i] = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device)
            except ImageError as e:
                out[i] = e
    return out


def plain_jpeg(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> bytes | None:
    """The file's bytes if any JPEG decoder gives what load_image would: a JPEG within the limits, RGB or
    grey, with no EXIF turn to apply. None sends it load_image's way (which also words any error)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = path.read_bytes() if path.is_file() and 0 < path.stat().st_size <= max_bytes else None
    if not isinstance(source, (bytes, bytearray)) or not 0 < len(source) <= max_bytes or source[:3] != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(io.BytesIO(source)) as image:  # reads the header only
            upright = image.getexif().get(0x0112, 1) == 1  # Orientation
            plain = image.mode in ("RGB", "L") and image.width * image.height <= max_pixels
            return bytes(source) if upright and plain else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
