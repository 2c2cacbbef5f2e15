"""Tree comparison: what an operator (and the test suite) uses to check that copies are exact."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from fleetsync import paths
from fleetsync.hashing import hash_fd

Fingerprint = tuple


def fingerprint_tree(root: str | bytes, *, mtimes: bool = True,
                     ignore: paths.IgnoreRules | None = None) -> dict[bytes, Fingerprint]:
    """Map every path under root to (kind, mode, size, mtime_ns, hash) or (link, target) or (dir, mode)."""
    rules = ignore or paths.IgnoreRules()
    rootb = os.fsencode(root)
    out: dict[bytes, Fingerprint] = {}
    for rel, st, full in _walk(rootb):
        if rules.ignored(rel):
            continue
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", stat.S_IMODE(st.st_mode))
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(full))
        elif stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                digest, _ = hash_fd(fd)
            finally:
                os.close(fd)
            out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns if mtimes else 0, digest.hex())
    return out


def _walk(rootb: bytes) -> Iterator[tuple[bytes, os.stat_result, bytes]]:
    stack = [b""]
    while stack:
        d = stack.pop()
        full_d = os.path.join(rootb, d) if d else rootb
        try:
            with os.scandir(full_d) as it:
                for de in it:
                    rel = paths.join(d, de.name)
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield rel, st, de.path
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(rel)
        except FileNotFoundError:
            continue


def diff_trees(a: dict[bytes, Fingerprint], b: dict[bytes, Fingerprint], limit: int = 20) -> list[str]:
    """Human-readable differences between two fingerprints (at most `limit` lines)."""
    out: list[str] = []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            out.append(f"{p!r}: {a.get(p)} != {b.get(p)}")
            if len(out) >= limit:
                out.append("…")
                break
    return out
