"""Work begun on an uploaded image before a request asks for it.

A client sends its file first (Gradio's upload) and the request that uses it after; a browser, when the
person picks the file, seconds before they press a button. The server is idle in between. `Uploads.begin`
uses that time: the load, the face gate and the embedding at the index's input size run on a file as
soon as it lands, and the request that names it takes the result (`Uploads.take`) instead of doing them.

Only spare time is used. Nothing begins while a request is being served, and a request that finds its
file's work not yet started does that work itself (the early run is dropped), so the work is never done
twice and never waits in a line. A face, or an image that cannot be loaded, is found early too: the
request raises the same error it would have raised (a clip or a huge image is left to its request).
Entries are kept for later requests on the same file (a region search redrawn): at most `capacity` of
them and `max_pixels` in all (the memory of eight 12-megapixel photos: a phone's 24 or 48 megapixels are
prepared too, in fewer entries), the least recently begun or taken dropped first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from .model import Features


@dataclass(frozen=True)
class Prepared:
    """An uploaded image, loaded and let through the face gate, and its features at the index's size."""
    image: Image.Image
    features: Features


Key = tuple[str, int, int]  # (resolved path, bytes, modification time in ns): a changed file is another


class Uploads:
    """Prepares uploaded image files in one background thread; `prepare` is the work (load, gate, embed)."""

    def __init__(self, prepare: Callable[[str], Prepared], capacity: int = 8, max_pixels: int = 96_000_000):
        self._prepare, self.capacity, self.max_pixels = prepare, capacity, max_pixels
        self._entries: OrderedDict[Key, Future] = OrderedDict()  # least recently begun or taken first
        self._pixels: dict[Key, int] = {}  # of each entry whose work has started
        self._lock = threading.Lock()
        self._serving = 0  # requests under way: while any is, nothing begins
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare-upload")

    def begin(self, path: str) -> bool:
        """Starts preparing the image file at `path` unless a request is being served or it is begun already;
        returns whether it began. Never blocks on the work itself."""
        key = _key(path)
        if key is None:
            return False
        with self._lock:
            if self._serving or key in self._entries:
                return False
            self._make_room()
            self._entries[key] = self._pool.submit(self._run, key)
            return True

    def take(self, source) -> Prepared | None:
        """The prepared work for `source` if it is a file begun here, waiting for it if under way; None
        when there is none (or it had not started: the caller does it now). Raises what the work raised."""
        key = _key(source) if isinstance(source, (str, Path)) else None
        with self._lock:
            future = self._entries.get(key) if key else None
            if future is None:
                return None
            if future.cancel():  # not started: the request is quicker doing it itself
                self._drop(key)
                return None
            self._entries.move_to_end(key)
        try:
            return future.result()
        except CancelledError:
            return None

    @contextmanager
    def serving(self) -> Iterator[None]:
        """`with uploads.serving():` around a request, so no early work begins while it runs."""
        with self._lock:
            self._serving += 1
        try:
            yield
        finally:
            with self._lock:
                self._serving -= 1

    def _run(self, key: Key) -> Prepared | None:
        """The work, on an image of at most max_pixels, once the others' fit beside it; anything else is
        left to its request, which says what is wrong with it in its own words."""
        try:
            with Image.open(key[0]) as probe:  # the header only
                pixels = probe.width * probe.height
        except Exception:  # noqa: BLE001  (not an image Pillow knows: a clip, a corrupt file)
            return None
        if pixels > self.max_pixels:
            return None
        with self._lock:
            self._pixels[key] = pixels
            for other in list(self._entries):  # the one thread runs this entry only: the others wait or are done
                if sum(self._pixels.values()) <= self.max_pixels:
                    break
                if other != key:
                    self._drop(other)
        return self._prepare(key[0])

    def _make_room(self) -> None:
        """Drops the least recently begun or taken entries, bar the one under way, until one more fits
        (lock held)."""
        for key in list(self._entries):
            if len(self._entries) < self.capacity:
                return
            if not self._entries[key].running():
                self._drop(key)

    def _drop(self, key: Key) -> None:
        """Forgets an entry (lock held); one not yet started never starts. A request that took it keeps it."""
        self._entries.pop(key).cancel()
        self._pixels.pop(key, None)


def _key(path) -> Key | None:
    try:
        resolved = Path(path).resolve()
        stat = resolved.stat()
    except (OSError, ValueError, TypeError):
        return None
    return str(resolved), stat.st_size, stat.st_mtime_ns
