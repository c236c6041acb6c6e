"""Clips in, frames out (sampled, within limits, each refusal a clear message), and frames back to a video."""
from __future__ import annotations

import av
import pytest
from conftest import ROOT, write_clip
from PIL import Image

from dino_demo.frames import ClipLimits, VideoError, read_clip, write_video


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "pan.mp4", seconds=5, fps=24)


def test_a_clip_is_sampled_at_the_limits_rate_with_each_frames_time(mp4):
    clip = read_clip(mp4, ClipLimits(fps=8))
    assert len(clip.frames) == 40 and clip.size == (320, 240)
    assert clip.times[:3] == pytest.approx([0, 0.125, 0.25], abs=0.01)
    assert clip.rate == pytest.approx(8, abs=0.1)
    assert all(f.mode == "RGB" and f.size == (320, 240) for f in clip.frames)
    # the frames are the clip's, in order: the pan moves the marigold leftwards
    first, last = (f.convert("L").resize((8, 6)).tobytes() for f in (clip.frames[0], clip.frames[-1]))
    assert first != last


def test_a_clip_slower_than_the_rate_gives_each_frame_once(tmp_path):
    clip = read_clip(write_clip(tmp_path / "slow.mp4", seconds=2, fps=4), ClipLimits(fps=8))
    assert len(clip.frames) == 8 and clip.rate == pytest.approx(4, abs=0.1)


@pytest.mark.parametrize("codec, name", [("libvpx", "clip.webm"), ("gif", "clip.gif")])
def test_webm_and_gif_clips_are_read(tmp_path, codec, name):
    clip = read_clip(write_clip(tmp_path / name, seconds=1, fps=10, codec=codec), ClipLimits(fps=8))
    assert 7 <= len(clip.frames) <= 9 and clip.size == (320, 240)


def test_bytes_are_read_like_a_file(mp4):
    assert len(read_clip(mp4.read_bytes()).frames) == len(read_clip(mp4).frames)


@pytest.mark.parametrize("limits, words", [
    (ClipLimits(seconds=3), "5.0 s long; the limit is 3 s"),
    (ClipLimits(pixels=320 * 239), "frames are 320x240"),
    (ClipLimits(bytes=1000), "MB; the limit is"),
    (ClipLimits(frames=20), "more than 20 frames"),
])
def test_a_clip_over_a_limit_is_refused_with_what_to_change(mp4, limits, words):
    with pytest.raises(VideoError, match=words):
        read_clip(mp4, limits)


def test_a_clip_whose_header_hides_its_length_is_stopped_while_decoding(tmp_path):
    gif = write_clip(tmp_path / "long.gif", seconds=4, fps=5, codec="gif")
    with pytest.raises(VideoError, match="3 s"):
        read_clip(gif, ClipLimits(seconds=3))


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"this is a text file, not a video" * 10, "not a video"),
    ((ROOT / "assets" / "collection" / "mate-red-marigold.jpg").read_bytes(), "no video"),
])
def test_what_is_not_a_clip_is_refused_clearly(content, words):
    with pytest.raises(VideoError, match=words):
        read_clip(content)


def test_a_clip_with_no_frames_is_refused(tmp_path):
    whole = write_video([Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(10)], 8, tmp_path / "whole.mp4")
    data = whole.read_bytes()
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(data[: data.find(b"mdat") - 4])  # its header and index, none of its frames
    with pytest.raises(VideoError, match="no frames"):
        read_clip(empty)


def test_a_cut_short_clip_gives_the_frames_before_the_cut(mp4, tmp_path):
    data = mp4.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    try:
        clip = read_clip(cut)
    except VideoError as e:  # or, if nothing decodes, says so
        assert "frames" in str(e) or "not a video" in str(e)
    else:
        assert 0 < len(clip.frames) <= 40


def test_written_video_is_h264_mp4_a_browser_plays_with_every_frame(tmp_path):
    frames = [Image.new("RGB", (121, 67), (i * 20, 100, 200 - i * 20)) for i in range(10)]
    path = write_video(frames, 8, tmp_path / "out.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("mov,mp4")
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (120, 66)  # even sides for 4:2:0
        decoded = [f.to_image() for f in container.decode(stream)]
    assert len(decoded) == 10
    assert float(stream.average_rate) == pytest.approx(8)
    assert abs(decoded[9].getpixel((60, 33))[0] - 180) < 12  # the last frame is the last one given
    assert path.read_bytes().find(b"moov") < path.read_bytes().find(b"mdat")  # index first: plays while loading
