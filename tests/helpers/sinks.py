"""A HintSink for detector tests: records every hint it receives."""

from __future__ import annotations

from typing import Any

Call = tuple[Any, ...]


class RecordingSink:
    """A HintSink that records every call as a tuple."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

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

    def paths(self) -> set[bytes]:
        """Every path mentioned by a hint."""
        out: set[bytes] = set()
        for c in self.calls:
            if c[0] == "moved":
                out.update((c[1], c[2]))
            elif c[0] != "root_lost":
                out.add(c[1])
        return out
