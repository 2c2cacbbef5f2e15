"""Tree snapshots (bytes paths) and human-readable diffs for comparing origin and replicas."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import threading
from typing import Iterable

# Upload temp names the origin ignores; excluded from both sides of every comparison.
IGNORED_PATTERNS: tuple[bytes, ...] = (b"*.part", b"*.filepart", b".*.tmp", b"*.swp", b".~tmp~")
# The replica's own transient temp files (also matched by ``.*.tmp``).
REPLICA_TEMP_PATTERN: bytes = b".fleetsync.*.tmp"

Entry = tuple  # ("dir", mode) | ("file", mode, size, mtime_ns, sha256hex) | ("link", target) | ("other", fmt)

_hash_cache: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def is_ignored(name: bytes) -> bool:
    """True when a single path component matches one of the ignored upload-temp patterns."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in IGNORED_PATTERNS)


def is_replica_temp(name: bytes) -> bool:
    """True when a name looks like a replica's own temp file (``.fleetsync.*.tmp``)."""
    return fnmatch.fnmatchcase(name, REPLICA_TEMP_PATTERN)


def file_hash(path: bytes, st: os.stat_result | None = None) -> str:
    """SHA-256 hex of a file's bytes, cached by (dev, ino, size, mtime_ns, ctime_ns)."""
    if st is None:
        st = os.lstat(path)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _hash_lock:
        hit = _hash_cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        if len(_hash_cache) > 200_000:
            _hash_cache.clear()
        _hash_cache[key] = digest
    return digest


def _fsencode(root: str | bytes | os.PathLike) -> bytes:
    return os.fsencode(os.fspath(root))


def snapshot(root: str | bytes | os.PathLike, ignored_out: list[bytes] | None = None) -> dict[bytes, Entry]:
    """Walk ``root`` (not following symlinks) and return {relative bytes path: entry tuple}.

    Ignored temp names (and whole ignored directories) are skipped; their relative paths are
    appended to ``ignored_out`` when given. Entries that vanish during the walk are skipped.
    """
    base = _fsencode(root)
    out: dict[bytes, Entry] = {}
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(base, rel_dir) if rel_dir else base
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for de in entries:
            name = de.name
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if is_ignored(name):
                if ignored_out is not None:
                    ignored_out.append(rel)
                continue
            try:
                st = os.lstat(de.path)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(mode))
                stack.append(rel)
            elif stat.S_ISLNK(st.st_mode):
                try:
                    out[rel] = ("link", os.readlink(de.path))
                except FileNotFoundError:
                    continue
            elif stat.S_ISREG(st.st_mode):
                try:
                    digest = file_hash(de.path, st)
                except (FileNotFoundError, PermissionError):
                    continue
                out[rel] = ("file", oct(mode), st.st_size, st.st_mtime_ns, digest)
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def _fmt_entry(e: Entry) -> str:
    if e[0] == "file":
        return f"file mode={e[1]} size={e[2]} mtime_ns={e[3]} sha256={e[4][:12]}"
    if e[0] == "dir":
        return f"dir mode={e[1]}"
    if e[0] == "link":
        return f"symlink -> {e[1]!r}"
    return repr(e)


def diff(a: dict[bytes, Entry], b: dict[bytes, Entry], a_name: str = "origin", b_name: str = "replica",
         limit: int = 40) -> list[str]:
    """Human-readable differences between two snapshots (at most ``limit`` lines plus a summary)."""
    lines: list[str] = []
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    for k in only_a:
        lines.append(f"missing on {b_name}: {k!r} ({_fmt_entry(a[k])})")
    for k in only_b:
        lines.append(f"extra on {b_name}: {k!r} ({_fmt_entry(b[k])})")
    for k in changed:
        ea, eb = a[k], b[k]
        if ea[0] != eb[0]:
            lines.append(f"kind differs at {k!r}: {a_name} {_fmt_entry(ea)} / {b_name} {_fmt_entry(eb)}")
            continue
        fields = {"file": ("kind", "mode", "size", "mtime_ns", "sha256"), "dir": ("kind", "mode"),
                  "link": ("kind", "target")}.get(ea[0], ("kind", "value"))
        parts = [f"{f}: {x!r} != {y!r}" for f, x, y in zip(fields, ea, eb) if x != y]
        lines.append(f"differs at {k!r}: " + "; ".join(parts) + f"  ({a_name} vs {b_name})")
    total = len(lines)
    if total > limit:
        lines = lines[:limit] + [f"... and {total - limit} more differences"]
    return lines


def files_only(snap: dict[bytes, Entry]) -> dict[bytes, Entry]:
    """Only the regular-file entries of a snapshot."""
    return {k: v for k, v in snap.items() if v[0] == "file"}


def total_file_bytes(snap: dict[bytes, Entry], paths: Iterable[bytes] | None = None) -> int:
    """Sum of file sizes in a snapshot (optionally restricted to ``paths``)."""
    keys = snap.keys() if paths is None else paths
    return sum(snap[k][2] for k in keys if k in snap and snap[k][0] == "file")
