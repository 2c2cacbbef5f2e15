"""Hypothesis strategies for filesystem workloads and an executor that applies them to an origin tree."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import stat
import time
from typing import Sequence

from hypothesis import strategies as st

from . import tree

# Odd names that must replicate exactly (none matches an ignored upload-temp pattern).
ODD_NAMES: tuple[bytes, ...] = (
    b"with space",
    b" leading and trailing ",
    b"new\nline",
    b"\xff\xfe",
    b"latin1 \xe9t\xe9",
    b"caf\xc3\xa9.html",
    b"tab\there",
    b"back\\slash",
    b"quote'\"`$(x)",
    b"*?[glob]",
    b"-dash",
    b"n" * 255,
    b"\xff" * 255,
    b"x" * 200 + b".html",
)

_plain_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10).map(
    lambda s: s.encode())
_ext = st.sampled_from([b"", b".html", b".css", b".js", b".png", b".txt"])

NAMES = st.one_of(st.tuples(_plain_name, _ext).map(lambda t: t[0] + t[1]), st.sampled_from(ODD_NAMES))
SIZES = st.one_of(st.just(0), st.integers(1, 512), st.integers(0, 64 * 1024))
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o640, 0o664, 0o400, 0o700, 0o4755, 0o2755, 0o1644, 0o000)
DIR_MODES = (0o755, 0o700, 0o750, 0o775, 0o2775, 0o1777, 0o711)
SEL = st.integers(0, 10_000)


@dataclasses.dataclass(frozen=True)
class Op:
    """One abstract operation; ``sel``/``sel2`` are resolved modulo the current candidates."""

    kind: str
    sel: int = 0
    sel2: int = 0
    name: bytes = b""
    size: int = 0
    seed: int = 0
    mode: int = 0
    variant: int = 0


def _op(kind: str, **fields: st.SearchStrategy) -> st.SearchStrategy[Op]:
    return st.builds(Op, kind=st.just(kind), **fields)


_seed = st.integers(0, 2**32 - 1)

OPS: st.SearchStrategy[Op] = st.one_of(
    _op("create", sel=SEL, name=NAMES, size=SIZES, seed=_seed),
    _op("create", sel=SEL, name=NAMES, size=SIZES, seed=_seed),
    _op("edit", sel=SEL, size=st.integers(1, 4096), seed=_seed, variant=st.integers(0, 10_000)),
    _op("append", sel=SEL, size=st.integers(1, 8192), seed=_seed),
    _op("truncate", sel=SEL, variant=st.integers(0, 100)),
    _op("delete", sel=SEL),
    _op("rename", sel=SEL, sel2=SEL, name=NAMES, variant=st.integers(0, 2)),
    _op("mkdir", sel=SEL, name=NAMES, size=st.integers(1, 3), seed=_seed),
    _op("mkdir", sel=SEL, name=NAMES, size=st.integers(1, 3), seed=_seed),
    _op("mkdir", sel=SEL, name=NAMES, size=st.integers(1, 3), seed=_seed),
    _op("rename_dir", sel=SEL, sel2=SEL, name=NAMES, variant=st.integers(0, 1)),
    _op("rename_dir", sel=SEL, sel2=SEL, name=NAMES, variant=st.integers(0, 1)),
    _op("rmtree", sel=SEL),
    _op("chmod", sel=SEL, mode=st.sampled_from(FILE_MODES), variant=st.just(0)),
    _op("chmod", sel=SEL, mode=st.sampled_from(DIR_MODES), variant=st.just(1)),
    _op("symlink", sel=SEL, sel2=SEL, name=NAMES, variant=st.integers(0, 2)),
    _op("upload", sel=SEL, name=NAMES, size=SIZES, seed=_seed, variant=st.integers(0, 3)),
    _op("sleep", size=st.integers(0, 400)),
)


def workloads(min_size: int = 5, max_size: int = 40) -> st.SearchStrategy[list[Op]]:
    """Strategy for a list of abstract filesystem operations."""
    return st.lists(OPS, min_size=min_size, max_size=max_size)


class Executor:
    """Applies abstract ops under ``root/base`` (bytes paths), resolving indices against the current tree."""

    def __init__(self, root: str | bytes | os.PathLike, base: bytes = b"w") -> None:
        """``base`` is the workload's own subtree (created if needed, never removed)."""
        self.root = os.fsencode(os.fspath(root))
        self.base = base
        self.abs_base = os.path.join(self.root, base)
        os.makedirs(self.abs_base, exist_ok=True)
        self.log: list[str] = []
        self.times: list[float] = []  # time.time() after each log line's operation

    # ------------------------------------------------------------- tree queries
    def _scan(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """(dirs, regular files, symlinks) as relative-to-root bytes paths, sorted; dirs[0] is base."""
        dirs, files, links = [self.base], [], []
        stack = [self.base]
        while stack:
            d = stack.pop()
            with os.scandir(os.path.join(self.root, d)) as it:
                for de in it:
                    rel = os.path.join(d, de.name)
                    if tree.is_ignored(de.name):
                        continue
                    if de.is_symlink():
                        links.append(rel)
                    elif de.is_dir(follow_symlinks=False):
                        dirs.append(rel)
                        stack.append(rel)
                    elif de.is_file(follow_symlinks=False):
                        files.append(rel)
        return [self.base] + sorted(dirs[1:]), sorted(files), sorted(links)

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel)

    @staticmethod
    def _pick(seq: Sequence[bytes], i: int) -> bytes | None:
        return seq[i % len(seq)] if seq else None

    @staticmethod
    def _data(size: int, seed: int) -> bytes:
        return random.Random(seed).randbytes(size)

    def _writable(self, rel: bytes) -> None:
        """Make sure the owner can write (only matters when not running as root)."""
        if os.geteuid() != 0:
            st_ = os.lstat(self._abs(rel))
            if not st_.st_mode & stat.S_IWUSR:
                os.chmod(self._abs(rel), stat.S_IMODE(st_.st_mode) | stat.S_IWUSR)

    def replenish(self, seed: int, min_dirs: int = 4, min_files: int = 12) -> list[str]:
        """Top the workload subtree up to a few directories and files so ops have material to act on."""
        rng = random.Random(seed)
        made: list[str] = []
        dirs, files, _ = self._scan()
        k = 0
        while len(dirs) < min_dirs + 1:
            rel = os.path.join(self.base, b"seed%d-%d" % (seed % 1000, k), b"sub%d" % k)
            os.makedirs(self._abs(rel), exist_ok=True)
            made.append(f"mkdir {rel!r}")
            dirs, files, _ = self._scan()
            k += 1
        while len(files) < min_files:
            rel = os.path.join(rng.choice(dirs), b"seeded%d-%d.html" % (seed % 1000, k))
            if os.path.lexists(self._abs(rel)):  # e.g. an earlier example's symlink renamed over it
                k += 1
                continue
            with open(self._abs(rel), "wb") as f:
                f.write(self._data(rng.randint(0, 20000), rng.getrandbits(32)))
            made.append(f"create {rel!r}")
            files.append(rel)
            k += 1
        self.log.extend("seed: " + m for m in made)
        self.times.extend([time.time()] * len(made))
        return made

    # ------------------------------------------------------------- execution
    def run(self, ops: Sequence[Op]) -> list[str]:
        """Apply every op; ops that cannot apply to the current tree are skipped. Returns a log."""
        for op in ops:
            try:
                msg = getattr(self, "_do_" + op.kind)(op)
            except OSError as e:
                msg = f"skipped ({e.__class__.__name__}: {e.strerror})"
            self.log.append(f"{op.kind}: {msg}")
            self.times.append(time.time())
        return self.log

    def _do_sleep(self, op: Op) -> str:
        time.sleep(op.size / 1000)
        return f"{op.size} ms"

    def _do_create(self, op: Op) -> str:
        dirs, _, _ = self._scan()
        rel = os.path.join(self._pick(dirs, op.sel), op.name)
        p = self._abs(rel)
        if os.path.islink(p) or (os.path.lexists(p) and not os.path.isfile(p)):
            return f"skipped, {rel!r} exists and is not a regular file"
        if os.path.lexists(p):
            self._writable(rel)
        with open(p, "wb") as f:
            f.write(self._data(op.size, op.seed))
        return f"{rel!r} ({op.size} bytes)"

    def _do_edit(self, op: Op) -> str:
        _, files, _ = self._scan()
        rel = self._pick(files, op.sel)
        if rel is None:
            return "skipped, no files"
        self._writable(rel)
        size = os.lstat(self._abs(rel)).st_size
        off = op.variant % (size + 1)
        with open(self._abs(rel), "r+b") as f:
            f.seek(off)
            f.write(self._data(op.size, op.seed))
        return f"{rel!r} at {off} ({op.size} bytes)"

    def _do_append(self, op: Op) -> str:
        _, files, _ = self._scan()
        rel = self._pick(files, op.sel)
        if rel is None:
            return "skipped, no files"
        self._writable(rel)
        with open(self._abs(rel), "ab") as f:
            f.write(self._data(op.size, op.seed))
        return f"{rel!r} (+{op.size} bytes)"

    def _do_truncate(self, op: Op) -> str:
        _, files, _ = self._scan()
        rel = self._pick(files, op.sel)
        if rel is None:
            return "skipped, no files"
        size = os.lstat(self._abs(rel)).st_size
        new = size * op.variant // 100
        self._writable(rel)
        os.truncate(self._abs(rel), new)
        return f"{rel!r} {size} -> {new}"

    def _do_delete(self, op: Op) -> str:
        _, files, links = self._scan()
        rel = self._pick(files + links, op.sel)
        if rel is None:
            return "skipped, no files"
        os.unlink(self._abs(rel))
        return f"{rel!r}"

    def _do_rename(self, op: Op) -> str:
        dirs, files, links = self._scan()
        src = self._pick(files + links, op.sel)
        if src is None:
            return "skipped, no files"
        if op.variant == 0:  # within its directory
            dst = os.path.join(os.path.dirname(src), op.name)
        elif op.variant == 1:  # across directories
            dst = os.path.join(self._pick(dirs, op.sel2), op.name)
        else:  # over an existing file
            others = [f for f in files if f != src]
            dst = self._pick(others, op.sel2)
            if dst is None:
                return "skipped, no other file"
        if os.path.isdir(self._abs(dst)) and not os.path.islink(self._abs(dst)):
            return f"skipped, {dst!r} is a directory"
        os.rename(self._abs(src), self._abs(dst))
        return f"{src!r} -> {dst!r}"

    def _do_mkdir(self, op: Op) -> str:
        dirs, _, _ = self._scan()
        parent = self._pick(dirs, op.sel)
        rng = random.Random(op.seed)
        parts = [op.name] + [b"d%d" % rng.randint(0, 3) for _ in range(op.size - 1)]
        rel = os.path.join(parent, *parts)
        os.makedirs(self._abs(rel), exist_ok=True)
        return f"{rel!r}"

    def _do_rename_dir(self, op: Op) -> str:
        dirs, _, _ = self._scan()
        if len(dirs) < 2:
            return "skipped, no directory to move"
        src = self._pick(dirs[1:], op.sel)
        parent = self._pick(dirs, op.sel2)
        if parent == src or parent.startswith(src + b"/"):
            return f"skipped, cannot move {src!r} into itself"
        name = os.path.basename(src) if op.variant == 0 else op.name
        dst = os.path.join(parent, name)
        if dst == src:
            return "skipped, same place"
        os.rename(self._abs(src), self._abs(dst))
        return f"{src!r} -> {dst!r}"

    def _do_rmtree(self, op: Op) -> str:
        dirs, _, _ = self._scan()
        if len(dirs) < 2:
            return "skipped, no directory to delete"
        rel = self._pick(dirs[1:], op.sel)
        shutil.rmtree(self._abs(rel))
        return f"{rel!r}"

    def _do_chmod(self, op: Op) -> str:
        dirs, files, _ = self._scan()
        rel = self._pick(files if op.variant == 0 else dirs, op.sel)
        if rel is None:
            return "skipped, nothing to chmod"
        os.chmod(self._abs(rel), op.mode)
        return f"{rel!r} {op.mode:o}"

    def _do_symlink(self, op: Op) -> str:
        dirs, files, _ = self._scan()
        d = self._pick(dirs, op.sel)
        rel = os.path.join(d, op.name)
        if os.path.lexists(self._abs(rel)):
            return f"skipped, {rel!r} exists"
        target_file = self._pick(files, op.sel2)
        if op.variant == 0 or target_file is None:
            target = b"dangling/" + op.name  # relative, points nowhere
        else:
            target = os.path.relpath(target_file, d)
        os.symlink(target, self._abs(rel))
        return f"{rel!r} -> {target!r}"

    def _do_upload(self, op: Op) -> str:
        """sftp-style upload: write ``name.part`` (or another temp name) in pieces, then rename (or abandon)."""
        dirs, _, _ = self._scan()
        d = self._pick(dirs, op.sel)
        final = os.path.join(d, op.name)
        if os.path.lexists(self._abs(final)) and (os.path.isdir(self._abs(final)) or os.path.islink(self._abs(final))):
            return f"skipped, {final!r} is not a file"
        temp_name = [op.name[:200] + b".part", op.name[:200] + b".filepart", b"." + op.name[:200] + b".tmp",
                     op.name[:200] + b".swp"][op.variant % 4]
        temp = os.path.join(d, temp_name)
        data = self._data(op.size, op.seed)
        with open(self._abs(temp), "wb") as f:
            for off in range(0, max(1, len(data)), 16384):
                f.write(data[off:off + 16384])
                f.flush()
                time.sleep(0.01)
        if op.seed % 5 == 0:
            return f"abandoned {temp!r}"
        os.rename(self._abs(temp), self._abs(final))
        return f"{temp!r} -> {final!r}"
