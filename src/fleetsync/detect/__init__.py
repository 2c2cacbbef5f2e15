"""Change detection: detectors turn filesystem activity into *hints* for the indexer.

A hint only says "this path (or subtree) may have changed"; the indexer verifies it with lstat
and hashing. Backends (inotify, and later fanotify/scan/publish) implement `Detector` and call a
`HintSink`.
"""

from __future__ import annotations

import logging
from typing import Protocol


class HintSink(Protocol):
    """Receives hints from a detector (implemented by the indexer)."""

    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        """Path may have new content or attributes; `writing` = still open for writing."""

    def removed(self, path: bytes) -> None:
        """Path may be gone."""

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        """Path was renamed from old to new (both inside the root)."""

    def rescan(self, path: bytes) -> None:
        """Everything under path must be compared with the manifest (new dir, overflow)."""

    def root_lost(self, reason: str) -> None:
        """The root itself vanished, moved or was unmounted: pause propagation."""


class Detector(Protocol):
    """A source of hints for one root."""

    name: str

    def start(self, sink: HintSink) -> None:
        """Begin watching (attaches to the running event loop)."""

    def drain(self) -> None:
        """Deliver every event the kernel has queued so far, synchronously."""

    def close(self) -> None:
        """Stop watching."""


class TracingSink:
    """A HintSink that logs every hint (logger `fleetsync.hints`, DEBUG) before passing it on."""

    def __init__(self, sink: HintSink) -> None:
        self._sink = sink
        self._log = logging.getLogger("fleetsync.hints")

    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        """Log, then forward."""
        self._log.debug("changed %r writing=%s closed=%s", path, writing, closed)
        self._sink.changed(path, writing=writing, closed=closed)

    def removed(self, path: bytes) -> None:
        """Log, then forward."""
        self._log.debug("removed %r", path)
        self._sink.removed(path)

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        """Log, then forward."""
        self._log.debug("moved %r -> %r dir=%s", old, new, is_dir)
        self._sink.moved(old, new, is_dir)

    def rescan(self, path: bytes) -> None:
        """Log, then forward."""
        self._log.debug("rescan %r", path)
        self._sink.rescan(path)

    def root_lost(self, reason: str) -> None:
        """Log, then forward."""
        self._log.debug("root_lost %s", reason)
        self._sink.root_lost(reason)
