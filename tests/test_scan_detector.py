"""The portable scanner notices replacements that leave a directory's names unchanged."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fleetsync.detect.scan import ScanDetector
from fleetsync.index.indexer import Indexer
from fleetsync.journal.sqlite import SqliteJournal


class Recorder:
    """A HintSink that remembers the hints."""

    def __init__(self) -> None:
        self.hints: list[tuple[str, bytes]] = []

    def changed(self, path: bytes, *, writing: bool = False, closed: bool = False) -> None:
        self.hints.append(("changed", path))

    def removed(self, path: bytes) -> None:
        self.hints.append(("removed", path))

    def moved(self, old: bytes, new: bytes, is_dir: bool) -> None:
        self.hints.append(("moved", new))

    def rescan(self, path: bytes) -> None:
        self.hints.append(("rescan", path))

    def root_lost(self, reason: str) -> None:
        self.hints.append(("root_lost", reason.encode()))


@pytest.mark.parametrize("replace", ["link-by-link", "file-by-link", "link-by-file"])
def test_same_name_replacement_is_hinted(tmp_path: Path, replace: str) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"a")
    entry = root / "d" / "x"
    if replace == "file-by-link":
        entry.write_bytes(b"file")
    else:
        os.symlink("a", entry)
    j = SqliteJournal(str(tmp_path / "o.db"), content_index=False)
    ix = Indexer(str(root), j, settle=0.0)
    for p in (b"d", b"d/a", b"d/x"):
        ix.changed(p, closed=True)

    async def run() -> list[tuple[str, bytes]]:
        await asyncio.sleep(0.01)
        await ix.process_ready()
        assert j.get(b"d/x") is not None
        rec = Recorder()
        det = ScanDetector(str(root), j.db_path, interval=0.05)
        det.start(rec)  # type: ignore[arg-type]
        try:
            while det.passes < 1:
                await asyncio.sleep(0.02)
            rec.hints.clear()
            os.unlink(entry)  # same name, new object: the directory's names do not change
            if replace == "link-by-file":
                entry.write_bytes(b"now a file")
                os.utime(entry, ns=(0, j.get(b"d/x").mtime_ns))  # the edit pass must not be what finds it
            else:
                os.symlink("elsewhere", entry)
            seen = det.passes
            while det.passes < seen + 2:
                await asyncio.sleep(0.02)
        finally:
            det.close()
        return rec.hints

    hints = asyncio.run(run())
    assert ("changed", b"d/x") in hints, hints
