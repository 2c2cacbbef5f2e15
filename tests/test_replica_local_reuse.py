"""A batch's new files whose content the replica already holds under other paths are copied
locally, not fetched; a local copy that no longer matches its manifest row is not used."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.apiserver import ApiServer, replica_in


async def test_content_held_elsewhere_is_copied_not_fetched(origin: ApiServer, tmp_path: Path) -> None:
    x, y, z = b"x" * 3000, b"y" * 2000, b"z" * 1000
    origin.put("one", x)
    origin.put("two", y)
    rep = replica_in(tmp_path, origin.url, rid="t")
    root = tmp_path / "replica"
    try:
        await rep.apply_batch(origin.journal.read(0, 10))
        assert rep.stats.bytes_fetched == len(x) + len(y)
        # The replica's copy of "two" is changed behind its back: its manifest row no longer holds.
        (root / "two").write_bytes(b"Y" * 2000)
        fetched0 = rep.stats.bytes_fetched
        origin.put("copy-of-one", x)   # held at "one": copied
        origin.put("copy-of-one-2", x)  # the same content twice in one batch
        origin.put("copy-of-two", y)   # "two" is stale: fetched
        origin.put("new", z)           # nowhere: fetched
        await rep.apply_batch(origin.journal.read(2, 10))
        assert rep.stats.bytes_fetched - fetched0 == len(y) + len(z)
    finally:
        await rep.close()
    assert (root / "copy-of-one").read_bytes() == x and (root / "copy-of-one-2").read_bytes() == x
    assert (root / "copy-of-two").read_bytes() == y and (root / "new").read_bytes() == z
