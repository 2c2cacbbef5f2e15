"""A resync's content fetch against a real API server: duplicates, gone and changed content."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetsync.entry import Entry
from fleetsync.hashing import hash_bytes
from fleetsync.replica.follower import Replica
from fleetsync.replica.pipeline import RetryLater
from tests.helpers.apiserver import ApiServer


def _replica(tmp_path: Path, url: str) -> Replica:
    (tmp_path / "state").mkdir(exist_ok=True)
    return Replica(str(tmp_path / "replica"), str(tmp_path / "state"), url, "t")


async def test_duplicates_gone_and_large_content(origin: ApiServer, tmp_path: Path) -> None:
    big = bytes(range(256)) * (5 << 12)  # 5 MiB: fetched on its own
    items: list[tuple[bytes, Entry]] = [
        (b"a/x.css", origin.put("a/x.css", b"alpha" * 100)),
        (b"c/dup1", origin.put("c/dup1", b"same")),
        (b"c/dup2", origin.put("c/dup2", b"same")),
        (b"d/gone", origin.put("d/gone", b"gone soon")),
        (b"e/big.bin", origin.put("e/big.bin", big)),
    ]
    # Later versions superseded two of them at the origin (the snapshot being applied is older):
    origin.put("c/dup1", b"newer")  # the path the blob is asked for first: gone there…
    origin.put("d/gone", b"newer")
    rep = _replica(tmp_path, origin.url)
    try:
        await rep._fetch_and_write(items)
    finally:
        await rep.close()
    root = tmp_path / "replica"
    assert (root / "a/x.css").read_bytes() == b"alpha" * 100
    assert (root / "c/dup2").read_bytes() == b"same"  # …but still at the other path: fetched from there
    assert not (root / "c/dup1").exists() and not (root / "d/gone").exists()  # skipped: the later version follows
    assert hash_bytes((root / "e/big.bin").read_bytes()) == hash_bytes(big)
    for p, e in items:
        if (root / p.decode()).exists():
            st = (root / p.decode()).stat()
            assert (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777) == (e.size, e.mtime_ns, e.mode)
    assert rep.stats.files_written == 3


@pytest.mark.parametrize("how", ["rewritten", "deleted"])
async def test_changed_content_is_retried_not_written(origin: ApiServer, tmp_path: Path, how: str) -> None:
    """The origin's file no longer matches its manifest (its record is not written yet): retry later."""
    items = [(b"a/one", origin.put("a/one", b"one")), (b"a/two", origin.put("a/two", b"two"))]
    if how == "rewritten":
        (origin.root / "a" / "two").write_bytes(b"TWO")  # same size, other bytes
    else:
        (origin.root / "a" / "two").unlink()
    rep = _replica(tmp_path, origin.url)
    try:
        with pytest.raises(RetryLater, match="changed at"):
            await rep._fetch_and_write(items)
    finally:
        await rep.close()
    assert not (tmp_path / "replica" / "a" / "two").exists()
