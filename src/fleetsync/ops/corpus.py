"""Deterministic web-asset corpus and change rounds (the shape in the design brief).

Sizes are log-normal around a median of ~8 KiB with a few files of a few MiB; files sit in
directories of 100-1000 entries (optionally a few huge ones) at depth 2-5. A change round of K
files is ~60% new, 25% modified in place, 10% deleted, 5% renamed or moved.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

EXTS = (".html", ".css", ".js", ".png", ".jpg", ".svg", ".json", ".woff2")


def _size(rng: random.Random, scale: float = 1.0) -> int:
    if rng.random() < 0.002:
        return int(rng.randint(1 << 20, 4 << 20) * scale)
    return int(max(0, min(int(rng.lognormvariate(9.0, 1.2)), 1 << 20)) * scale)


def _content(rng: random.Random, size: int) -> bytes:
    # Random but cheap: a repeated random block, with a unique prefix so hashes differ.
    head = rng.getrandbits(128).to_bytes(16, "big")
    block = rng.randbytes(min(size, 4096)) or b""
    reps = size // max(len(block), 1) + 1
    return (head + block * reps)[:size]


@dataclass
class Corpus:
    """A generated tree and the list of its files (relative byte paths)."""

    root: str
    files: list[bytes] = field(default_factory=list)
    dirs: list[bytes] = field(default_factory=list)
    seed: int = 1
    #: Every file size is multiplied by this (a smaller corpus with the same shape and file count).
    size_scale: float = 1.0
    _n: int = 0

    def _new_name(self, rng: random.Random) -> bytes:
        self._n += 1
        return f"asset-{self._n:07d}{rng.choice(EXTS)}".encode()


def generate(root: str, n_files: int, *, seed: int = 1, huge_dirs: int = 0, huge_size: int = 20000,
             size_scale: float = 1.0) -> Corpus:
    """Write n_files into root with the corpus shape (sizes times size_scale); returns the Corpus."""
    rng = random.Random(seed)
    c = Corpus(root, seed=seed, size_scale=size_scale)
    rootb = os.fsencode(root)
    os.makedirs(rootb, exist_ok=True)
    remaining = n_files
    sizes_left = [huge_size] * huge_dirs
    while remaining > 0:
        depth = rng.randint(2, 5)
        d = b"/".join(f"d{rng.randint(0, 30):02d}".encode() for _ in range(depth - 1))
        if d in c.dirs:
            d += f"-{len(c.dirs)}".encode()
        c.dirs.append(d)
        os.makedirs(os.path.join(rootb, d), exist_ok=True)
        count = min(remaining, sizes_left.pop() if sizes_left else rng.randint(100, 1000))
        for _ in range(count):
            p = d + b"/" + c._new_name(rng)
            with open(os.path.join(rootb, p), "wb") as f:
                f.write(_content(rng, _size(rng, size_scale)))
            c.files.append(p)
        remaining -= count
    return c


def mutate(c: Corpus, k: int, *, seed: int = 2) -> dict[str, int]:
    """Apply one change round of k file changes; returns counts per kind."""
    rng = random.Random(seed)
    rootb = os.fsencode(c.root)
    counts = {"new": 0, "modified": 0, "deleted": 0, "renamed": 0}
    for _ in range(k):
        r = rng.random()
        if r < 0.60 or len(c.files) < 10:
            p = rng.choice(c.dirs) + b"/" + c._new_name(rng)
            with open(os.path.join(rootb, p), "wb") as f:
                f.write(_content(rng, _size(rng, c.size_scale)))
            c.files.append(p)
            counts["new"] += 1
        elif r < 0.85:
            p = rng.choice(c.files)
            with open(os.path.join(rootb, p), "r+b") as f:
                f.seek(0)
                f.write(rng.randbytes(64))
            counts["modified"] += 1
        elif r < 0.95:
            i = rng.randrange(len(c.files))
            p = c.files.pop(i)
            os.unlink(os.path.join(rootb, p))
            counts["deleted"] += 1
        else:
            i = rng.randrange(len(c.files))
            p = c.files[i]
            q = rng.choice(c.dirs) + b"/" + c._new_name(rng)
            os.rename(os.path.join(rootb, p), os.path.join(rootb, q))
            c.files[i] = q
            counts["renamed"] += 1
    return counts
