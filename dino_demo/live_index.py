"""An index folder served while it changes: a new manifest is noticed and the new state swapped in whole.

A background thread looks at the manifest every few seconds. When it changed (an add, a remove, a
compaction or a rebuild committed), the new state is opened beside the old one and then replaces
it in one assignment: a request that started on the old state finishes on it (Engine reads
`.index` once per request), and the next one sees the new state.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .errors import UserError
from .index import MANIFEST, Index, load_index

log = logging.getLogger(__name__)


class LiveIndex:
    """The current state of an index folder, re-opened when its manifest changes."""

    def __init__(self, index: Index, model: dict | None = None, every: float = 0.0):
        """Serve `index`; with `every` > 0, look for a new manifest every `every` seconds."""
        self.index, self.model, self.every = index, model, every
        self._stamp = _stamp(index.path)
        self._stop = threading.Event()
        self._thread = None
        if every > 0:
            self._thread = threading.Thread(target=self._watch, name="index-watch", daemon=True)
            self._thread.start()

    @classmethod
    def fixed(cls, index: Index) -> "LiveIndex":
        """An index that is never re-opened (tests, evaluation)."""
        return cls(index)

    def refresh(self) -> bool:
        """Swap in the folder's new state if its manifest changed; True if it did. A state that cannot
        be opened (a change half-way through being cleaned up) is skipped: the next look tries again."""
        stamp = _stamp(self.index.path)
        if stamp == self._stamp or stamp is None:
            return False
        try:
            fresh = load_index(self.index.path, self.model)
        except (UserError, OSError, RuntimeError) as e:
            log.warning("index folder changed but could not be opened yet: %s", e)
            return False
        self.index, self._stamp = fresh, stamp
        log.warning("index reloaded: %d images (generation %d)", fresh.count, fresh.generation)
        return True

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.refresh()


def _stamp(folder: Path) -> tuple | None:
    """What changes when the manifest is replaced: its inode and modification time."""
    try:
        st = os.stat(folder / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
