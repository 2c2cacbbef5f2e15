"""Byte paths: validation against the root and a lossless wire encoding.

POSIX paths are bytes. On the wire a path is a string made by percent-encoding every byte that is
not an unreserved ASCII character, so any name (non-UTF-8, newlines, spaces) survives exactly.
"""

from __future__ import annotations

import fnmatch
import re
from urllib.parse import quote_from_bytes, unquote_to_bytes

from fleetsync.errors import UnsafePath

MAX_NAME = 255
MAX_PATH = 4096
_SAFE = "/ !$&'()*+,;=:@~-._"

#: Upload temp names that are never recorded (fnmatch patterns, matched on the last component).
DEFAULT_IGNORE: tuple[str, ...] = ("*.part", "*.filepart", ".*.tmp", "*.swp", ".~tmp~", "*.~tmp~")
#: Prefix of fleetsync's own temp files on replicas.
TEMP_PREFIX = b".fleetsync."
TEMP_SUFFIX = b".tmp"


def encode(path: bytes) -> str:
    """Encode a byte path for JSON/URLs, losslessly."""
    return quote_from_bytes(path, safe=_SAFE)


def decode(text: str) -> bytes:
    """Decode a wire path (inverse of encode); does not validate."""
    if not isinstance(text, str):
        raise UnsafePath(f"path must be a string, got {type(text).__name__}")
    return unquote_to_bytes(text)


def validate(path: bytes) -> bytes:
    """Return path if it is a safe relative path under a root, else raise UnsafePath."""
    if not isinstance(path, bytes):
        raise UnsafePath(f"path must be bytes, got {type(path).__name__}")
    if not path:
        raise UnsafePath("empty path")
    if len(path) > MAX_PATH:
        raise UnsafePath(f"path of {len(path)} bytes exceeds {MAX_PATH}")
    if b"\0" in path:
        raise UnsafePath(f"NUL byte in path {path[:80]!r}")
    if path.startswith(b"/"):
        raise UnsafePath(f"absolute path {path[:80]!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise UnsafePath(f"bad component {part!r} in path {path[:80]!r}")
        if len(part) > MAX_NAME:
            raise UnsafePath(f"component of {len(part)} bytes exceeds {MAX_NAME} in {path[:80]!r}")
    return path


def decode_checked(text: str) -> bytes:
    """Decode and validate a wire path."""
    return validate(decode(text))


def parent(path: bytes) -> bytes:
    """Parent of a relative path (b'' for top-level names)."""
    i = path.rfind(b"/")
    return b"" if i < 0 else path[:i]


def name(path: bytes) -> bytes:
    """Last component of a relative path."""
    return path.rsplit(b"/", 1)[-1]


def join(base: bytes, child: bytes) -> bytes:
    """Join relative paths where base may be b'' (the root)."""
    return child if not base else base + b"/" + child


def is_under(path: bytes, ancestor: bytes) -> bool:
    """True if path equals ancestor or lies inside it (ancestor b'' is the root)."""
    return not ancestor or path == ancestor or path.startswith(ancestor + b"/")


def rebase(path: bytes, old: bytes, new: bytes) -> bytes:
    """Move path from under old to under new (path must be under old)."""
    return new + path[len(old):]


class IgnoreRules:
    """Decides which names are upload temp files never to be recorded."""

    def __init__(self, patterns: tuple[str, ...] | list[str] = DEFAULT_IGNORE) -> None:
        self.patterns = tuple(patterns)
        rx = "|".join(fnmatch.translate(p) for p in self.patterns) or r"(?!)"
        self._rx = re.compile(rx.encode("utf-8", "surrogateescape"), re.DOTALL)

    def ignored(self, path: bytes) -> bool:
        """True if the last component of path matches an ignore pattern or is a fleetsync temp."""
        nm = name(path)
        if nm.startswith(TEMP_PREFIX) and nm.endswith(TEMP_SUFFIX):
            return True
        return self._rx.match(nm) is not None
