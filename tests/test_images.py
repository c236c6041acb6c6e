import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from dino_demo.errors import UserError
from dino_demo.images import ImageError, load_image, make_thumbnail


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` pixels whose data is a few bytes: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_jpeg_bytes_become_rgb():
    image = load_image(encode(make_image(1, (40, 30)), "JPEG"))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(encode(source, "JPEG", exif=exif))
    assert image.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "RGBA", "LA", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    image = load_image(Image.new(mode, (8, 6)))
    assert image.mode == "RGB" and image.size == (8, 6)


def test_sixteen_bit_png_keeps_its_contrast():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    image = load_image(encode(Image.fromarray(ramp)))
    pixels = np.asarray(image)[:, :, 0]
    assert pixels.min() == 0 and pixels.max() > 240  # scaled, not clipped to white
    assert pixels[0, 1] < pixels[7, 7]


def test_transparent_palette_image_is_composited_on_white():
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((5, 5), 1)
    image = load_image(encode(palette))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (12, 12), c) for c in ("red", "blue", "green")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(data).getpixel((6, 6))[0] > 200


def test_arrays_of_any_numeric_type_are_accepted():
    assert load_image(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)
    floats = load_image(np.linspace(0, 1, 35).reshape(5, 7))
    assert np.asarray(floats)[-1, -1, 0] == 255
    assert load_image(np.full((4, 4, 1), 40000, np.uint16)).size == (4, 4)
    with pytest.raises(ImageError, match="HxW"):
        load_image(np.zeros((2, 2, 5)))


def test_file_path_and_datasets_dict_are_read(tmp_path):
    path = tmp_path / "a.png"
    make_image(2, (33, 22)).save(path)
    assert load_image(path).size == (33, 22)
    assert load_image(str(path)).size == (33, 22)
    assert load_image({"bytes": path.read_bytes(), "path": None}).size == (33, 22)
    assert load_image({"bytes": None, "path": str(path)}).size == (33, 22)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"hello, this is text", "not an image"),
    (b"<!DOCTYPE html><html><body>not a photo</body></html>", "not an image"),
])
def test_non_images_get_a_clear_message(data, words):
    with pytest.raises(ImageError, match=words) as caught:
        load_image(data)
    assert isinstance(caught.value, UserError)


def test_truncated_jpeg_is_refused_as_corrupt():
    data = encode(make_image(3, (200, 150)), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="40000x40000") as caught:
        load_image(png_header_only(40000, 40000))
    assert caught.value.reason == "too large"


@pytest.mark.parametrize("size", [(8160, 6144), (6144, 8160)])  # a phone's 50-megapixel photo, either way up
def test_a_fifty_megapixel_phone_photo_is_within_the_default_limit(size):
    with pytest.raises(ImageError) as caught:  # a header only: past the limit's check, then nothing to decode
        load_image(png_header_only(*size))
    assert caught.value.reason != "too large" and "megapixels" not in str(caught.value)
    with pytest.raises(ImageError, match="12000x9000 = 108 megapixels; the limit is 52"):  # a 108-megapixel mode
        load_image(png_header_only(12000, 9000))


def test_pixel_and_byte_limits_are_configurable():
    data = encode(make_image(4, (100, 100)))
    with pytest.raises(ImageError, match="megapixels"):
        load_image(data, max_pixels=5000)
    with pytest.raises(ImageError, match="MB"):
        load_image(data, max_bytes=100)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_missing_file_and_none_are_refused(tmp_path):
    with pytest.raises(ImageError, match="No image file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="No image"):
        load_image(None)


def test_extreme_aspect_ratios_load():
    assert load_image(encode(Image.new("RGB", (1, 1)))).size == (1, 1)
    assert load_image(encode(Image.new("RGB", (10000, 100)))).size == (10000, 100)


def test_thumbnail_is_a_small_jpeg_with_the_same_aspect():
    thumb = Image.open(io.BytesIO(make_thumbnail(make_image(5, (400, 200)), 128)))
    assert thumb.format == "JPEG" and thumb.size == (128, 64)


# --- load_image_tensors: nvJPEG for plain JPEGs where there is one, load_image's path for the rest ---

def jpeg_cases() -> dict[str, object]:
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees to show upright
    make_image(3, (40, 30)).save(turned, "JPEG", exif=exif)
    return {"rgb jpeg": encode(make_image(1, (40, 30)), "JPEG"),
            "grey jpeg": encode(make_image(2, (40, 48)).convert("L"), "JPEG"),
            "datasets dict": {"bytes": encode(make_image(4, (32, 32)), "JPEG"), "path": None},
            "png": encode(make_image(5, (36, 30)), "PNG"),
            "exif-turned jpeg": turned.getvalue(),
            "cmyk jpeg": encode(make_image(6, (36, 28)).convert("CMYK"), "JPEG"),
            "truncated jpeg": encode(make_image(7, (40, 30)), "JPEG")[:100]}


class FakeGpuDecoder:
    """Stands in for nvJPEG on a machine without a GPU: records what it is given, decodes with Pillow."""
    def __init__(self, fail: bool = False):
        self.given: list[bytes] = []
        self.fail = fail

    def __call__(self, files: list[bytes]):
        import torch

        self.given += files
        if self.fail:
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(f)).convert("RGB")).copy()).permute(2, 0, 1)
                for f in files]


def expected_tensor(source):
    return np.asarray(load_image(source)).transpose(2, 0, 1)


def test_without_cuda_and_torchvision_there_is_no_gpu_decoder():
    import torch

    from dino_demo.images import nvjpeg

    assert nvjpeg("cpu") is None
    assert nvjpeg("cuda") is None or torch.cuda.is_available()


def test_plain_jpegs_go_to_the_gpu_decoder_and_every_other_file_the_cpu_way(tmp_path):
    from dino_demo.images import load_image_tensors

    cases = jpeg_cases()
    path = tmp_path / "photo.jpg"
    path.write_bytes(cases["rgb jpeg"])
    cases["jpeg file path"] = str(path)
    decoder = FakeGpuDecoder()
    out = dict(zip(cases, load_image_tensors(list(cases.values()), "cpu", jpeg_decoder=decoder)))
    assert decoder.given == [cases["rgb jpeg"], cases["grey jpeg"], cases["datasets dict"]["bytes"], cases["rgb jpeg"]]
    assert isinstance(out["truncated jpeg"], ImageError)
    for name, source in cases.items():
        if name != "truncated jpeg":
            assert out[name].dtype.is_floating_point is False and np.array_equal(out[name].numpy(), expected_tensor(source)), name
    assert out["exif-turned jpeg"].shape == (3, 40, 30)  # turned upright by load_image, not sent sideways to nvJPEG


def test_a_batch_the_gpu_decoder_fails_on_is_decoded_on_the_cpu():
    from dino_demo.images import load_image_tensors

    cases = jpeg_cases()
    sources = [cases["rgb jpeg"], cases["png"]]
    out = load_image_tensors(sources, "cpu", jpeg_decoder=FakeGpuDecoder(fail=True))
    assert [np.array_equal(t.numpy(), expected_tensor(s)) for t, s in zip(out, sources)] == [True, True]


def test_without_a_gpu_decoder_every_image_takes_the_cpu_path():
    from dino_demo.images import load_image_tensors

    cases = jpeg_cases()
    out = load_image_tensors([cases["rgb jpeg"], cases["truncated jpeg"]], "cpu")
    assert np.array_equal(out[0].numpy(), expected_tensor(cases["rgb jpeg"])) and isinstance(out[1], ImageError)


def test_a_jpeg_over_the_pixel_limit_is_refused_before_any_decoding():
    from dino_demo.images import load_image_tensors

    decoder = FakeGpuDecoder()
    out = load_image_tensors([encode(make_image(1, (40, 30)), "JPEG")], "cpu", max_pixels=1000, jpeg_decoder=decoder)
    assert decoder.given == [] and isinstance(out[0], ImageError) and out[0].reason == "too large"
