"""A replica's debug log: one line per applied batch, with its records and the time of each phase."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from fleetsync.entry import DELETE, Record
from fleetsync.replica.follower import Replica
from tests.helpers.apiserver import ApiServer


async def test_each_applied_batch_is_logged_with_its_phases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    origin = ApiServer(tmp_path, content_index=False)
    await origin.start()
    (tmp_path / "r").mkdir()
    rep = Replica(str(tmp_path / "r"), str(tmp_path / "rs"), origin.url, "t")
    try:
        e1 = origin.put("a/one.css", b"body{}" * 50)
        e2 = origin.put("a/two.js", b"let x;" * 70)
        recs = origin.journal.read(0, 10)
        with caplog.at_level(logging.DEBUG, logger="fleetsync.replica"):
            assert await rep.apply_batch(recs) == 2
            assert await rep.apply_batch([Record(3, DELETE, b"a/one.css")]) == 1
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
        assert len(lines) == 2, lines
        pat = (r"batch (\d+)-(\d+): (\d+) records, (\d+) files written, (\d+) bytes fetched; plan [\d.]+ ms, "
               r"fetch and apply [\d.]+ ms, flush [\d.]+ ms, commit [\d.]+ ms \(begun [\d.]+ ms after the flush\)")
        first, second = (re.fullmatch(pat, ln) for ln in lines)
        assert first and first.groups() == ("1", "2", "2", "2", str(e1.size + e2.size))
        assert second and second.groups() == ("3", "3", "1", "0", "0")
    finally:
        await rep.close()
        await origin.stop()
