"""Silence what native libraries print straight to the process's stdout and stderr (file descriptors
1 and 2), which Python's own redirection and logging settings cannot reach."""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_HELD = threading.RLock()  # fds 1 and 2 belong to the process: one silence at a time


@contextmanager
def silenced_output() -> Iterator[None]:
    """Send fds 1 and 2 to /dev/null for the duration (other threads' output too: keep it brief).

    Threads take turns: two overlapping silences would each save what the other had set, and the
    last to finish would leave the process's output going to /dev/null for good."""
    with _HELD:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1), os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in (*saved, null):
                os.close(fd)
