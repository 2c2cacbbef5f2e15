"""Bulk content for a fresh bootstrap: worker processes that each stream a share of the blobs and write them.

A replica bootstrapping into an empty root spends most of its time in the kernel, creating and
writing files (BENCHMARKS.md: about 70 % of its CPU), and one Python process runs that on one core.
Threads do not help (the GIL hand-offs of 100,000 small writes cost more than they overlap), so
a fresh bootstrap hands each batch of small files to a pool of worker processes: each one POSTs
its batch to the upstream's `/v1/blobs` on a connection of its own, verifies every blob against
its hash, and writes it atomically through its own `ConfinedRoot` (the same confinement as the
replica's). The parent stays in charge of everything else: directories and symlinks (created
before a batch is handed out), large files, blobs a worker could not get, the flush and the
manifest. A worker only ever creates new names in a root that was empty, so nothing it does
needs undoing after a crash: the next bootstrap finds the files and checks them like any others.

A worker speaks the replica client's protocol: HTTP or HTTPS (certificates verified as the
client does), zstd-compressed streams when the replica negotiates them. A bootstrap under a
bandwidth limit stays in one process (the limit's token bucket lives there).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import http.client
import io
import json
import multiprocessing
import os
import resource
import signal
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from fleetsync import paths
from fleetsync.entry import Entry
from fleetsync.errors import FleetsyncError
from fleetsync.replica.fsops import ConfinedRoot, verify_digest
from fleetsync.replica.pipeline import RetryLater
from fleetsync.transport.compress import ENCODING, request_headers
from fleetsync.transport.wire import API, BATCH_MAX_HASHES, CHANGED, HEADER, OK

#: Read buffer of a worker's response stream.
READ_BUFFER = 1 << 20
#: Seconds a worker waits on its upstream connection before giving up.
TIMEOUT = 300.0


@dataclass(frozen=True)
class Upstream:
    """Where and how a worker fetches: the upstream's base URL, request headers (auth, replica id), zstd or not."""

    base: str
    headers: dict[str, str] = field(default_factory=dict)
    compress: bool = False


@dataclass
class ShareResult:
    """What one worker did with its share: files written, content bytes received, items left to the parent."""

    files: int = 0
    bytes: int = 0
    #: (path, entry) pairs the worker did not write (gone or too large upstream): the parent fetches them singly.
    left: list[tuple[bytes, Entry]] = field(default_factory=list)
    #: The worker process's peak RSS so far (bytes).
    peak_rss: int = 0


def usable(base: str, *, bwlimit: float | None) -> bool:
    """True if worker processes can fetch from this upstream as the replica's own client would."""
    return urllib.parse.urlsplit(base).scheme in ("http", "https") and not bwlimit


def default_workers() -> int:
    """Worker processes for a fresh bootstrap: one per CPU, at most 4 (FLEETSYNC_BOOTSTRAP_WORKERS overrides; 0 = none)."""
    env = os.environ.get("FLEETSYNC_BOOTSTRAP_WORKERS")
    if env is not None and env.strip():
        try:
            return max(0, int(env))
        except ValueError:
            raise FleetsyncError(f"FLEETSYNC_BOOTSTRAP_WORKERS must be a whole number, not {env!r}") from None
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def start_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of `workers` fresh interpreters (spawned, not forked: the parent runs an event loop and threads)."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_init_worker)


def _init_worker() -> None:
    """Die with the replica (PR_SET_PDEATHSIG) and leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


_roots: dict[bytes, ConfinedRoot] = {}


def fetch_share(up: Upstream, root: bytes, groups: list[list[tuple[bytes, Entry]]]) -> ShareResult:
    """Fetch the blobs of `groups` (each: the (path, entry) pairs of one content hash) and write every path.

    Runs in a worker process. Raises RetryLater if the upstream says a content changed since it
    was recorded, FleetsyncError (with the upstream and the blob) on any other failure.
    """
    fs = _roots.get(root)
    if fs is None:
        fs = _roots[root] = ConfinedRoot(root)
    res = ShareResult()
    u = urllib.parse.urlsplit(up.base)
    where = f"blob batch from {up.base}"
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname or "localhost", u.port or 443, timeout=TIMEOUT,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(u.hostname or "localhost", u.port or 80, timeout=TIMEOUT)
    try:
        for i in range(0, len(groups), BATCH_MAX_HASHES):
            part = groups[i:i + BATCH_MAX_HASHES]
            wants = [g[0][1].hash for g in part]
            body = json.dumps({"hashes": [d.hex() if d else "" for d in wants],
                               "paths": [paths.encode(g[0][0]) for g in part]}).encode()
            try:
                conn.request("POST", u.path.rstrip("/") + API + "/blobs", body=body,
                             headers={**up.headers, "Content-Type": "application/json",
                                      **request_headers(up.compress)})
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise FleetsyncError(f"{where}: {e!r}") from e
            if resp.status != 200:
                raise FleetsyncError(f"{where}: HTTP {resp.status}: {resp.read(2000).decode(errors='replace')}")
            enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
            raw: BinaryIO
            if enc == ENCODING:
                raw = zstandard.ZstdDecompressor().stream_reader(resp, read_across_frames=True)  # type: ignore[assignment]
            elif enc in ("identity", ""):
                raw = resp  # type: ignore[assignment]
            else:
                raise FleetsyncError(f"{where}: unsupported Content-Encoding {enc!r}")
            reader = io.BufferedReader(raw, READ_BUFFER)  # type: ignore[arg-type]
            try:
                _read_frames(reader, wants, part, fs, res, up.base, where)
            except zstandard.ZstdError as e:
                raise FleetsyncError(f"{where}: corrupt zstd stream: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                raise FleetsyncError(f"{where}: {e!r}") from e
    finally:
        conn.close()
        fs.flush_trash(strict=False)
    res.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def _read_frames(reader: io.BufferedReader, wants: list[bytes | None], part: list[list[tuple[bytes, Entry]]],
                 fs: ConfinedRoot, res: ShareResult, base: str, where: str) -> None:
    """Read one response's frames (one per wanted hash, in order) and write each blob at its paths."""
    for want, targets in zip(wants, part):
        hdr = reader.read(HEADER.size)
        if len(hdr) != HEADER.size:
            raise FleetsyncError(f"{where}: stream ended early")
        digest, status, length = HEADER.unpack(hdr)
        if digest != want:
            raise FleetsyncError(f"{where}: frame for {digest.hex()[:12]}… where "
                                 f"{want.hex()[:12] if want else '?'}… was expected")
        data = reader.read(length) if length else b""
        if len(data) != length:
            raise FleetsyncError(f"{where}: stream ended inside blob {digest.hex()[:12]}…")
        if status == OK:
            res.bytes += length
            verify_digest(data, targets[0][1], where)
            for p, e in targets:
                fs.write_file(p, data, e)
            res.files += len(targets)
        elif status == CHANGED:
            raise RetryLater(f"blob {digest.hex()[:12]}… changed at {base} since it was recorded; retrying")
        else:
            res.left.extend(targets)
    if reader.read(1):
        raise FleetsyncError(f"{where}: data after the last frame")


__all__ = ["Upstream", "ShareResult", "usable", "default_workers", "start_pool", "fetch_share"]
