"""Path validation and the lossless wire encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetsync import paths
from fleetsync.errors import UnsafePath

names = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@given(st.lists(names, min_size=1, max_size=6))
def test_encode_roundtrip_any_bytes(parts: list[bytes]) -> None:
    p = b"/".join(parts)
    wire = paths.encode(p)
    assert isinstance(wire, str) and wire.isascii()
    assert paths.decode(wire) == p
    assert paths.decode_checked(wire) == p


@pytest.mark.parametrize("bad", [b"", b"/etc/passwd", b"a/../b", b"..", b".", b"a//b", b"a/", b"a\0b",
                                 b"x" * 256, b"a/" + b"y" * 256, b"a/" * 2100 + b"a"])
def test_validate_rejects_hostile(bad: bytes) -> None:
    with pytest.raises(UnsafePath):
        paths.validate(bad)


def test_validate_accepts_odd_but_safe_names() -> None:
    for ok in [b"a b", b"new\nline", b"\xff\xfe", b"x" * 255, b"...", b"..a", b"a/.b/c"]:
        assert paths.validate(ok) == ok


def test_decode_rejects_non_string() -> None:
    with pytest.raises(UnsafePath):
        paths.decode_checked(None)  # type: ignore[arg-type]
    with pytest.raises(UnsafePath):
        paths.decode_checked("%2E%2E/x")  # '..' hidden by percent-encoding


def test_ignore_rules() -> None:
    r = paths.IgnoreRules()
    for p in [b"d/x.part", b"up.filepart", b"d/.hidden.tmp", b".x.swp", b".~tmp~", b"d/.fleetsync.1.2.tmp"]:
        assert r.ignored(p), p
    for p in [b"d/x.html", b"partial", b"d/tmp", b"x.tmp.html"]:
        assert not r.ignored(p), p


def test_rebase_and_under() -> None:
    assert paths.is_under(b"a/b/c", b"a/b")
    assert not paths.is_under(b"a/bc", b"a/b")
    assert paths.is_under(b"anything", b"")
    assert paths.rebase(b"a/b/c", b"a/b", b"x") == b"x/c"
