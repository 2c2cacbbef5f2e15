"""TracingSink: every hint is logged (fleetsync.hints, DEBUG) and forwarded unchanged."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fleetsync.detect import TracingSink


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        self.calls.append(("changed", path, writing, closed))

    def removed(self, path: bytes) -> None:
        self.calls.append(("removed", path))

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        self.calls.append(("moved", old, new, is_dir))

    def rescan(self, path: bytes) -> None:
        self.calls.append(("rescan", path))

    def root_lost(self, reason: str) -> None:
        self.calls.append(("root_lost", reason))


def test_hints_are_logged_and_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    rec = _Recorder()
    t = TracingSink(rec)
    with caplog.at_level(logging.DEBUG, logger="fleetsync.hints"):
        t.changed(b"a/\xff", closed=True)
        t.removed(b"b")
        t.moved(b"c", b"d", True)
        t.rescan(b"")
        t.root_lost("gone")
    assert rec.calls == [("changed", b"a/\xff", False, True), ("removed", b"b"), ("moved", b"c", b"d", True),
                         ("rescan", b""), ("root_lost", "gone")]
    msgs = [r.getMessage() for r in caplog.records if r.name == "fleetsync.hints"]
    assert msgs == ["changed b'a/\\xff' writing=False closed=True", "removed b'b'", "moved b'c' -> b'd' dir=True",
                    "rescan b''", "root_lost gone"]
