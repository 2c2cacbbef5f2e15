"""Self-checking file contents, a torn-read detector and a non-atomic in-place rewriter."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from typing import Callable, Iterable, Sequence

MAGIC = b"FSCHK1"


def make(body: bytes) -> bytes:
    """Return a self-checking blob: header ``FSCHK1 <len> <sha256hex>\\n`` followed by ``body``."""
    return b"%s %d %s\n" % (MAGIC, len(body), hashlib.sha256(body).hexdigest().encode()) + body


def check(data: bytes) -> bool:
    """True iff ``data`` is a complete self-checking blob (header length and hash match the body)."""
    nl = data.find(b"\n")
    if nl < 0:
        return False
    parts = data[:nl].split(b" ")
    if len(parts) != 3 or parts[0] != MAGIC:
        return False
    try:
        n = int(parts[1])
    except ValueError:
        return False
    body = data[nl + 1:]
    return len(body) == n and hashlib.sha256(body).hexdigest().encode() == parts[2]


Candidates = Sequence[bytes] | Callable[[], Iterable[bytes]]


class TornReader(threading.Thread):
    """Thread that keeps reading files under a replica root and records incomplete reads."""

    def __init__(self, root: str | bytes | os.PathLike, candidates: Candidates, pause: float = 0.001) -> None:
        """``candidates`` is a list of relative bytes paths or a callable returning the current ones."""
        super().__init__(daemon=True, name=f"TornReader({root!r})")
        self.root = os.fsencode(os.fspath(root))
        self.candidates = candidates
        self.pause = pause
        self.bad: list[tuple[bytes, int]] = []
        self.errors: list[tuple[bytes, str]] = []
        self.good = 0
        self._stop_evt = threading.Event()

    def _paths(self) -> Iterable[bytes]:
        c = self.candidates
        return list(c()) if callable(c) else list(c)

    def run(self) -> None:
        """Read every candidate in a loop until stopped."""
        while not self._stop_evt.is_set():
            for rel in self._paths():
                if self._stop_evt.is_set():
                    break
                path = os.path.join(self.root, rel)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    continue
                except OSError as e:  # unexpected: e.g. EACCES, EIO
                    self.errors.append((rel, repr(e)))
                    continue
                if check(data):
                    self.good += 1
                else:
                    self.bad.append((rel, len(data)))
            time.sleep(self.pause)

    def stop(self) -> tuple[list[tuple[bytes, int]], int]:
        """Stop the thread; return (bad reads as (path, length), number of good reads)."""
        self._stop_evt.set()
        self.join(timeout=30)
        return list(self.bad), self.good


def write_nonatomic(path: bytes, data: bytes, pieces: int = 4, rng: random.Random | None = None,
                    max_pause: float = 0.02) -> None:
    """Write ``data`` in place: open with O_TRUNC, write in ``pieces`` chunks with small sleeps, close."""
    rng = rng or random.Random()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        step = max(1, -(-len(data) // pieces))
        for off in range(0, len(data), step):
            os.write(fd, data[off:off + step])
            time.sleep(rng.uniform(0.0, max_pause))
    finally:
        os.close(fd)


class Rewriter(threading.Thread):
    """Thread that rewrites self-checking files in place, non-atomically, until stopped."""

    def __init__(self, root: str | bytes | os.PathLike, relpaths: Sequence[bytes], seed: int = 0,
                 max_body: int = 24 * 1024, gap: float = 0.03) -> None:
        """Rewrite each of ``relpaths`` under ``root`` in turn with fresh self-checking content."""
        super().__init__(daemon=True, name="Rewriter")
        self.root = os.fsencode(os.fspath(root))
        self.relpaths = list(relpaths)
        self.rng = random.Random(seed)
        self.max_body = max_body
        self.gap = gap
        self.writes = 0
        self.error: BaseException | None = None
        self._stop_evt = threading.Event()

    def run(self) -> None:
        """Loop over the files, rewriting each with O_TRUNC + several partial writes."""
        try:
            while not self._stop_evt.is_set():
                for rel in self.relpaths:
                    if self._stop_evt.is_set():
                        break
                    body = self.rng.randbytes(self.rng.randint(1, self.max_body))
                    write_nonatomic(os.path.join(self.root, rel), make(body),
                                    pieces=self.rng.randint(2, 5), rng=self.rng)
                    self.writes += 1
                    time.sleep(self.gap)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> int:
        """Stop rewriting; return the number of completed rewrites (re-raises a writer error)."""
        self._stop_evt.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error
        return self.writes
