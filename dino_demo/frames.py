"""The one place where video files become frames and frames become a video a browser plays (PyAV, whose
wheels carry FFmpeg: no system ffmpeg).

A clip is refused before its pixels are decoded when it breaks a limit its header already shows (size,
pixels per frame, length); a length the header does not give is checked while decoding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Union

from PIL import Image

from .errors import UserError
from .geometry import Size

VideoSource = Union[str, Path, bytes]
STILL_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe")  # pictures, not clips


class VideoError(UserError):
    """A clip that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ClipLimits:
    """What one clip may hold; the app's settings fill these in."""

    seconds: float = 10.0  # longest clip accepted
    frames: int = 80  # most frames analysed
    pixels: int = 2_100_000  # largest frame (width x height): Full HD
    bytes: int = 25 * 1024 * 1024
    fps: float = 8.0  # frames analysed per second of video


@dataclass
class Clip:
    """The frames of a video sampled at (up to) the limits' rate, with the second each is shown at."""

    frames: list[Image.Image]  # RGB
    times: list[float]  # seconds from the first frame
    size: Size  # every frame's (width, height)

    @property
    def rate(self) -> float:
        """Frames per second of the sampled frames (the source's own rate when it is lower)."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return 1.0
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def read_clip(source: VideoSource, limits: ClipLimits = ClipLimits()) -> Clip:
    """The clip's frames, one every 1/fps seconds (no frame twice), or a VideoError that says what to change."""
    import av

    data = _read_bytes(source, limits.bytes)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError):
        raise VideoError("This file is not a video that can be read; please upload an MP4, WebM or GIF clip.") from None
    with container:
        stream = _video_stream(container)
        _check_header(container, stream, limits)
        frames, times = [], []
        for image, time in _sampled(container, stream, limits):
            frames.append(image)
            times.append(time)
    if not frames:
        raise VideoError("The clip has no frames that can be decoded (it may be empty or cut short); "
                         "please upload another clip.")
    start = times[0]
    return Clip(frames, [t - start for t in times], frames[0].size)


def _read_bytes(source: VideoSource, max_bytes: int) -> bytes:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise VideoError(f"No video file at {path}.")
        if path.stat().st_size > max_bytes:
            raise VideoError(f"The clip is {path.stat().st_size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. "
                             "Please upload a shorter or smaller clip.")
        source = path.read_bytes()
    if not source:
        raise VideoError("The file is empty; please upload a clip (MP4, WebM or GIF).")
    if len(source) > max_bytes:
        raise VideoError(f"The clip is {len(source) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB. "
                         "Please upload a shorter or smaller clip.")
    return bytes(source)


def _video_stream(container):
    if container.format.name in STILL_FORMATS or not container.streams.video:
        raise VideoError("This file holds no video (a still picture or sound only?); upload the photo as a photo, "
                         "or a clip as MP4, WebM or GIF.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # decode with every core
    return stream


def _check_header(container, stream, limits: ClipLimits) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.pixels:
        raise VideoError(f"The clip's frames are {width}x{height}; the limit is {limits.pixels / 1e6:.1f} megapixels "
                         "a frame (Full HD). Please scale it down first.")
    seconds = _duration(container, stream)
    if seconds is not None and seconds > limits.seconds + 0.05:
        raise VideoError(f"The clip is {seconds:.1f} s long; the limit is {limits.seconds:g} s. "
                         "Please trim it (the first seconds are enough to see what DINO sees).")


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # in FFmpeg's microseconds
    return None


def _sampled(container, stream, limits: ClipLimits) -> Iterator[tuple[Image.Image, float]]:
    """(frame, seconds) one every 1/fps seconds, refusing a clip that runs past the limits as it decodes."""
    import av

    step, due, first, kept = 1.0 / limits.fps, None, None, 0
    try:
        for frame in container.decode(stream):
            time = float(frame.time) if frame.time is not None else kept * step
            first = time if first is None else first
            if time - first > limits.seconds + 0.05:
                raise VideoError(f"The clip runs past {limits.seconds:g} s, the limit. Please trim it.")
            if due is not None and time < due - 1e-6:
                continue
            kept += 1
            if kept > limits.frames:
                raise VideoError(f"The clip gives more than {limits.frames} frames at {limits.fps:g} a second, "
                                 "the limit. Please trim it.")
            due = (time if due is None else due) + step
            while due <= time:  # a gap in the clip: the next frame after it is due at once
                due += step
            yield frame.to_image(), time
    except av.FFmpegError:  # a cut-short file: keep what decoded
        return


def write_video(frames: list[Image.Image], rate: float, path: Path) -> Path:
    """An H.264 MP4 (yuv420p, even sides, moov first) of the frames at `rate` per second: browsers play it."""
    import av

    width, height = (side - side % 2 for side in frames[0].size)  # 4:2:0 needs even sides
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=Fraction(rate).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, width, height)))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path
