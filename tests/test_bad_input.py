"""Every row of the README's bad-input table, through the running app's API: a clear message (or a
correct result for odd but valid images), and the server answers a normal request afterwards."""
from __future__ import annotations

import io
import subprocess
import sys
import zlib

import httpx
import numpy as np
import pytest
from conftest import ROOT, make_image, write_clip
from PIL import Image

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

COLLECTION = ROOT / "assets" / "collection"
LADYBIRD, MARIGOLD = str(COLLECTION / "mate-ladybird-on-grass.jpg"), str(COLLECTION / "mate-red-marigold.jpg")
BOMB_SIDE = 40_000


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return Client(url, verbose=False, download_files=False)


def still_serving(client) -> None:
    _, result = client.predict(handle_file(LADYBIRD), 2, api_name="/search_image")
    assert len(result["results"]) == 2


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A real, valid side x side 1-bit PNG of zeros: ~200 KB on disk, 1.6 GB once decoded by Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer, parts = zlib.compressobj(9), []
    for _ in range(side // 1000):
        parts.append(packer.compress(row * 1000))
    parts.append(packer.flush())
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = encode(make_image(3, (300, 200)), "JPEG")
    return data[: len(data) // 2]


BAD_FILES = {  # name -> (file name, bytes, words of the message)
    "empty file": ("empty.jpg", lambda: b"", "The file is empty"),
    "non-image bytes": ("data.bin", lambda: bytes(range(256)) * 8, "not an image"),
    "truncated JPEG": ("cut.jpg", truncated_jpeg, "truncated or corrupt"),
    "HTML named .jpg": ("page.jpg", lambda: b"<!DOCTYPE html><html><body>hi</body></html>", "not an image"),
    "decompression bomb": ("bomb.png", bomb_png, f"{BOMB_SIDE}x{BOMB_SIDE} = 1600 megapixels; the limit is 52"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_file_gets_a_clear_message_on_every_endpoint(client, tmp_path, name):
    file_name, make, words = BAD_FILES[name]
    path = tmp_path / file_name
    path.write_bytes(make())
    bad = handle_file(str(path))
    calls = [lambda: client.predict(bad, 3, api_name="/search_image"),
             lambda: client.predict(bad, 10, 10, 50, 50, 3, False, api_name="/search_region"),
             lambda: client.predict(handle_file(MARIGOLD), bad, None, None, None, None, 5, api_name="/match_patches")]
    for endpoint in calls:
        with pytest.raises(AppError, match=words):
            endpoint()
    still_serving(client)


def test_a_decompression_bomb_is_refused_from_its_header_without_memory(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 1_000_000
    # VmHWM: this process's peak resident memory (ru_maxrss would include the forking pytest's)
    check = ("import sys; from dino_demo.images import load_image, ImageError\n"
             "try:\n    load_image(sys.argv[1])\nexcept ImageError as e:\n    print(e)\n"
             "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
             "print(int(peak.split()[1]) // 1024)")
    done = subprocess.run([sys.executable, "-c", check, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    message, peak_mb = done.stdout.strip().splitlines()
    assert "megapixels" in message
    assert int(peak_mb) < 300  # decoding it would take 1,600 MB


def test_an_upload_over_the_size_limit_is_refused(client, app_server, tmp_path):
    url, engine = app_server
    path = tmp_path / "huge.jpg"
    path.write_bytes(encode(make_image(1, (64, 64)), "JPEG") + b"\0" * (engine.max_bytes + 1))
    # gradio_client reads the limit from the app and refuses before sending
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {engine.max_bytes} bytes"):
        client.predict(handle_file(str(path)), 3, api_name="/search_image")
    with open(path, "rb") as f:  # a client that sends it anyway is cut off by the server
        reply = httpx.post(f"{url}gradio_api/upload", files={"files": f}, timeout=120)
    assert reply.status_code == 413 and f"exceeded maximum allowed size of {engine.max_bytes} bytes" in reply.text
    still_serving(client)


ODD_IMAGES = {  # name -> (bytes, the size the app sees: width, height)
    "1x1 pixel": (lambda: encode(Image.new("RGB", (1, 1), "red")), (1, 1)),
    "10000x100 strip": (lambda: encode(make_image(4, (10000, 100))), (10000, 100)),
    "16-bit greyscale": (lambda: encode(Image.fromarray((np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16))),
                         (96, 64)),
    "CMYK JPEG": (lambda: encode(make_image(5, (90, 60)).convert("CMYK"), "JPEG"), (90, 60)),
    "palette with transparency": (lambda: encode(make_image(6, (80, 70)).convert("P"), transparency=0), (80, 70)),
    "animated GIF": (lambda: encode(make_image(7, (64, 48)), "GIF", save_all=True,
                                    append_images=[make_image(8, (64, 48))], duration=80, loop=0), (64, 48)),
    "EXIF-rotated photo": (lambda: encode(make_image(9, (120, 60)), "JPEG", exif=_rotated()), (60, 120)),
}


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    return exif


@pytest.mark.parametrize("name", list(ODD_IMAGES))
def test_an_odd_but_valid_image_is_searched_and_matched(client, tmp_path, name):
    make, size = ODD_IMAGES[name]
    path = tmp_path / f"odd{'.gif' if 'GIF' in name else '.png'}"
    path.write_bytes(make())
    _, result = client.predict(handle_file(str(path)), 3, api_name="/search_image")
    assert (result["query"]["width"], result["query"]["height"]) == size and len(result["results"]) == 3
    _, result = client.predict(handle_file(str(path)), 0, 0, *size, 3, False, api_name="/search_region")
    assert result["query"]["box"] == [0, 0, *size] and len(result["results"]) == 3
    _, _, result = client.predict(handle_file(str(path)), handle_file(MARIGOLD), None, None, None, None, 5,
                                  api_name="/match_patches")
    assert result["count"] >= 1


@pytest.mark.parametrize("box, words", [
    ((100, 100, 100, 180), "has no area"),  # zero width
    ((600, 400, 700, 500), "has no area inside the 512x320 image"),  # wholly outside
    ((-50, -50, -1, -1), "has no area"),
])
def test_a_box_with_no_area_in_the_image_is_refused(client, box, words):
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(LADYBIRD), *box, 3, False, api_name="/search_region")
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(LADYBIRD), handle_file(MARIGOLD), *box, 5, api_name="/match_patches")
    still_serving(client)


def test_an_inverted_or_overhanging_box_is_read_as_the_box_it_covers(client):
    _, inverted = client.predict(handle_file(LADYBIRD), 398, 196, 322, 132, 3, False, api_name="/search_region")
    assert inverted["query"]["box"] == [322.0, 132.0, 398.0, 196.0]
    _, overhanging = client.predict(handle_file(LADYBIRD), -40, 300, 100, 900, 3, False, api_name="/search_region")
    assert overhanging["query"]["box"] == [0.0, 300.0, 100.0, 320.0]


def test_a_region_matching_nothing_still_gets_the_closest_regions_ranked(client, app_server, tmp_path):
    """No threshold: a region unlike anything indexed returns the nearest regions, with their (low) scores."""
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 200), (255, 0, 255)).save(blank)
    _, result = client.predict(handle_file(str(blank)), 20, 20, 120, 120, 5, False, api_name="/search_region")
    scores = [r["score"] for r in result["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    # a 2-pixel box between patch centres still uses the patch it lies on
    _, result = client.predict(handle_file(LADYBIRD), 1, 1, 3, 3, 5, False, api_name="/search_region")
    assert len(result["results"]) == 5


@pytest.mark.parametrize("k", [0, -1, 51, 10**6])
def test_k_out_of_range_is_refused_on_both_search_endpoints(client, k):
    with pytest.raises(AppError, match=f"between 1 and 50 \\(got {k}\\)"):
        client.predict(handle_file(LADYBIRD), k, api_name="/search_image")
    with pytest.raises(AppError, match=f"between 1 and 50 \\(got {k}\\)"):
        client.predict(handle_file(LADYBIRD), 10, 10, 80, 80, k, False, api_name="/search_region")
    still_serving(client)


def test_matching_an_image_with_itself_pairs_every_patch_with_itself(client, app_server):
    _, engine = app_server
    gh, gw = engine.embedder.grid
    _, summary, result = client.predict(handle_file(MARIGOLD), handle_file(MARIGOLD), None, None, None, None, 500,
                                        api_name="/match_patches")
    assert result["count"] == gh * gw and result["mean_score"] == pytest.approx(1.0, abs=1e-3)
    assert all(pair["a"] == pair["b"] for pair in result["pairs"])


# --- clips for What DINO sees ----------------------------------------------------------------------

def uploads_named(name: str) -> list:
    """Files of that name in Gradio's upload folder, where the clip the client sent was saved."""
    from pathlib import Path

    from gradio import utils as gr_utils

    return list(Path(gr_utils.get_upload_folder()).rglob(name))


def test_a_clip_with_a_face_in_frame_40_is_refused_and_not_kept(client, tmp_path):
    from conftest import write_clip

    clip = write_clip(tmp_path / "face-in-frame-40.mp4", seconds=6, fps=8, face_at=39)
    with pytest.raises(AppError, match=r"Frame 40 of the clip \(at 4\.9 s\) shows a person's face"):
        client.predict(handle_file(str(clip)), 60, api_name="/what_dino_sees_video")
    assert uploads_named("face-in-frame-40.mp4") == []  # nothing of it is kept
    still_serving(client)


@pytest.mark.parametrize("make, words", [
    (lambda path: path.write_bytes(b"just some text, named like a video" * 20), "not a video"),
    (lambda path: path.write_bytes(b""), "empty"),
    (lambda path: write_clip(path, seconds=11, fps=4, size=(64, 48)), "11.0 s long; the limit is 10 s"),
    (lambda path: write_clip(path, seconds=1, fps=4, size=(2048, 1152)), "frames are 2048x1152"),
    (lambda path: cut_before_frames(write_clip(path, seconds=1, fps=8)), "no frames"),
    (lambda path: Image.open(MARIGOLD).save(path, format="PNG"), "no video"),
])
def test_a_bad_clip_gets_a_clear_message_and_the_server_keeps_serving(client, tmp_path, make, words):
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(AppError, match=words):
        client.predict(handle_file(str(path)), 60, api_name="/what_dino_sees_video")
    still_serving(client)


def cut_before_frames(path):
    """The clip rewritten with its index first, then cut where its frames begin: a header, no frames."""
    from dino_demo.frames import read_clip, write_video

    write_video(read_clip(path).frames, 8, path)
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"mdat") - 4])
    return path
