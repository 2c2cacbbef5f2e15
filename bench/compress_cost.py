#!/usr/bin/env python3
"""What zstd on the batched blob stream costs and saves (issue 4, "Speed work").

1. **CPU.** The blob stream of a generated corpus (`fleetsync.ops.corpus`), framed as the server
   frames it (groups of 64 blobs, one zstd flush per group), compressed at several levels: ratio,
   compression and decompression throughput (one core). Also on a "realistic" mix in which text
   assets are real text (Python sources of the standard library) and images are incompressible
   random bytes, because the generator's content (a repeated random 4 KiB block) is far more
   compressible than real web assets.
2. **Loopback.** A real `fleetsync origin` over the corpus; every blob is fetched in `POST /v1/blobs`
   batches with and without `Accept-Encoding: zstd`: wall time and bytes on the wire.

Usage:  .venv/bin/python bench/compress_cost.py [--files 5000] [--workdir DIR] [--skip-loopback]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

import aiohttp  # noqa: E402
import zstandard  # noqa: E402

from fleetsync.hashing import hash_bytes  # noqa: E402
from fleetsync.ops.corpus import generate  # noqa: E402
from fleetsync.transport import compress  # noqa: E402
from fleetsync.transport.wire import HEADER, OK, frame_header  # noqa: E402

GROUP = 64


def read_tree(root: str) -> list[bytes]:
    out = []
    for d, _, files in os.walk(root):
        for f in sorted(files):
            with open(os.path.join(d, f), "rb") as fh:
                out.append(fh.read())
    return out


def realistic(n: int, seed: int = 1) -> list[bytes]:
    """Text assets from real source text, images as random bytes, in the corpus's extension mix."""
    rng = random.Random(seed)
    texts = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for d, _, files in os.walk(stdlib):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    texts.append(fh.read())
        if len(texts) > 3000:
            break
    out = []
    for _ in range(n):
        size = max(0, min(int(rng.lognormvariate(9.0, 1.2)), 1 << 20))
        if rng.random() < 0.375:  # .png .jpg .woff2 of the 8 extensions: already compressed
            out.append(rng.randbytes(size))
        else:
            buf = bytearray()
            while len(buf) < size:
                buf += rng.choice(texts)
            out.append(bytes(buf[:size]))
    return out


def stream_groups(blobs: list[bytes]) -> list[bytes]:
    groups = []
    for i in range(0, len(blobs), GROUP):
        parts = []
        for b in blobs[i:i + GROUP]:
            parts.append(frame_header(hash_bytes(b), OK, len(b)))
            parts.append(b)
        groups.append(b"".join(parts))
    return groups


def cpu(groups: list[bytes], level: int) -> dict[str, Any]:
    raw = sum(len(g) for g in groups)
    z = zstandard.ZstdCompressor(level=level).compressobj()
    t = time.perf_counter()
    out = [z.compress(g) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for g in groups]
    out.append(z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    tc = time.perf_counter() - t
    d = zstandard.ZstdDecompressor().decompressobj()
    t = time.perf_counter()
    n = sum(len(d.decompress(c)) for c in out if c)
    td = time.perf_counter() - t
    assert n == raw
    wire = sum(len(c) for c in out)
    return {"level": level, "raw_MB": round(raw / 1e6, 1), "wire_MB": round(wire / 1e6, 1),
            "ratio": round(raw / wire, 2), "compress_MBps": round(raw / tc / 1e6), "decompress_MBps": round(raw / td / 1e6)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fetch_all(url: str, hashes: list[str], zstd: bool) -> tuple[float, int, int, bool]:
    """Fetch every blob in batches of 2000; (seconds, wire bytes, payload bytes, compressed?)."""
    wire = payload = 0
    used = False
    async with aiohttp.ClientSession(auto_decompress=False, headers={"X-Fleetsync-Replica": "bench"}) as s:
        t = time.perf_counter()
        for i in range(0, len(hashes), 2000):
            chunk = hashes[i:i + 2000]
            async with s.post(url + "/v1/blobs", data=json.dumps({"hashes": chunk}),
                              headers={"Content-Type": "application/json", **compress.request_headers(zstd)}) as resp:
                assert resp.status == 200, await resp.text()
                r = compress.DecodingReader(resp)
                used |= r.compressed
                for _ in chunk:
                    digest, st, n = HEADER.unpack(await r.readexactly(HEADER.size))
                    data = await r.readexactly(n)
                    assert st != OK or hash_bytes(data) == digest
                    payload += n
                wire += r.wire_bytes
        return time.perf_counter() - t, wire, payload, used


def loopback(workdir: str, files: int) -> list[dict[str, Any]]:
    root = os.path.join(workdir, "lb-root")
    state = os.path.join(workdir, "lb-state")
    if not os.path.isdir(root):
        generate(root, files, seed=1)
    os.makedirs(state, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "fleetsync", "origin", "--root", root, "--state", state, "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        deadline = time.time() + 300
        while True:
            try:
                st = json.loads(urllib.request.urlopen(url + "/v1/status", timeout=2).read())
                if st.get("pending") == 0 and st.get("entries", 0) >= files:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "origin never finished indexing"
            time.sleep(0.5)
        hashes = []
        with urllib.request.urlopen(url + "/v1/snapshot") as resp:
            for line in resp:
                d = json.loads(line)
                e = d.get("e")
                if e and e.get("k") == "f":
                    hashes.append(e["h"])
        rows = []
        for rep in range(3):
            for z in (False, True):
                secs, wire, payload, used = asyncio.run(fetch_all(url, hashes, z))
                rows.append({"zstd_asked": z, "zstd_used": used, "rep": rep, "seconds": round(secs, 3),
                             "wire_MB": round(wire / 1e6, 1), "payload_MB": round(payload / 1e6, 1)})
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-loopback", action="store_true")
    a = ap.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="fleetsync-zstd-")
    try:
        root = os.path.join(workdir, "cpu-root")
        if not os.path.isdir(root):
            generate(root, a.files, seed=1)
        for name, blobs in (("generated corpus", read_tree(root)), ("realistic mix", realistic(a.files))):
            groups = stream_groups(blobs)
            for level in (1, 3):
                print(json.dumps({"content": name, **cpu(groups, level)}))
        if not a.skip_loopback:
            for row in loopback(workdir, a.files):
                print(json.dumps({"content": "loopback, generated corpus", **row}))
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
