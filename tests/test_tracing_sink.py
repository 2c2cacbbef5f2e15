"""TracingSink: every hint is logged (fleetsync.hints, DEBUG) and forwarded unchanged."""

from __future__ import annotations

import logging

import pytest

from fleetsync.detect import TracingSink
from tests.helpers.sinks import RecordingSink


def test_hints_are_logged_and_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    rec = RecordingSink()
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
