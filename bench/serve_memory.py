#!/usr/bin/env python3
"""Origin memory while it serves concurrent bootstraps (issue 4, peak RSS goal).

Starts `fleetsync origin` on an existing tree and state directory (for instance the 1M corpus
that `bench/detect_cost.py --keep` leaves behind), waits until it has reconciled, then lets
`--clients` clients each read the whole snapshot and then the first `--blobs` file blobs in
batches, as a bootstrapping replica does, discarding the data. The origin's VmRSS, VmHWM and
RssAnon are sampled every 0.5 s; the phases, the peak and the origin's CPU while serving are
printed, then a JSON summary.

Usage:  .venv/bin/python bench/serve_memory.py --root ROOT --state STATE [--clients 3] [--blobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from fleetsync.entry import FILE  # noqa: E402
from fleetsync.transport.client import UpstreamClient  # noqa: E402
from fleetsync.transport.wire import BATCH_MAX_HASHES  # noqa: E402


def _mem(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of pid in MB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def _cpu(pid: int) -> float:
    """utime + stime of pid in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def _bootstrap(base: str, i: int, nblobs: int, log: list[str]) -> None:
    """Read the snapshot, then the first nblobs file blobs (hinted by path), discarding the data."""
    c = UpstreamClient(base, replica_id=f"probe{i}")
    t0 = time.monotonic()
    try:
        _, _, entries = await c.snapshot()
        files: list[tuple[bytes, bytes]] = []
        n = 0
        async for rows in entries:
            for path, kind, _, _, _, digest, _ in rows:
                n += 1
                if kind == FILE and digest is not None and len(files) < nblobs:
                    files.append((digest, path))
        log.append(f"client {i}: snapshot of {n} entries in {time.monotonic() - t0:.1f} s")
        got = 0
        for k in range(0, len(files), BATCH_MAX_HASHES):
            chunk = files[k:k + BATCH_MAX_HASHES]
            async for _, _, data in c.blobs([h for h, _ in chunk], [p for _, p in chunk]):
                got += len(data)
        log.append(f"client {i}: {len(files)} blobs, {got / 1e6:.0f} MB, done at {time.monotonic() - t0:.1f} s")
    finally:
        await c.close()


async def _run(a: argparse.Namespace) -> dict[str, object]:
    exe = os.path.join(os.path.dirname(sys.executable), "fleetsync")
    base = f"http://127.0.0.1:{a.port}"
    origin = subprocess.Popen([exe, "origin", "--root", a.root, "--state", a.state, "--listen", f"127.0.0.1:{a.port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append((time.monotonic(), _mem(origin.pid)))
            except (FileNotFoundError, ProcessLookupError):
                return
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.monotonic()
        probe = UpstreamClient(base)
        try:
            while True:
                try:
                    st = await probe.status()
                    if st.get("scan", {}).get("running") == 0 and not st.get("pending"):
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                if origin.poll() is not None:
                    raise RuntimeError(f"origin exited with code {origin.returncode}")
                await asyncio.sleep(1)
        finally:
            await probe.close()
        ready = time.monotonic() - t0
        idle = _mem(origin.pid)
        print(f"origin reconciled in {ready:.1f} s; idle {idle}", flush=True)
        log: list[str] = []
        cpu0, t1 = _cpu(origin.pid), time.monotonic()
        await asyncio.gather(*(_bootstrap(base, i, a.blobs, log) for i in range(a.clients)))
        serve_s, serve_cpu = time.monotonic() - t1, _cpu(origin.pid) - cpu0
        print("\n".join(log))
        print(f"origin CPU while serving: {serve_cpu:.2f} s in {serve_s:.1f} s", flush=True)
        end = _mem(origin.pid)
    finally:
        stop.set()
        sampler.join()
        origin.terminate()
        origin.wait(30)
    peak = max((m for _, m in samples), key=lambda m: m.get("VmRSS", 0))
    print(f"after serving: {end}; highest sample: {peak}")
    return {"clients": a.clients, "blobs": a.blobs, "reconcile_s": round(ready, 1), "idle": idle,
            "end": end, "peak_sample": peak, "vmhwm_mb": end.get("VmHWM"),
            "serve_s": round(serve_s, 2), "serve_cpu_s": round(serve_cpu, 2)}


def main() -> int:
    """Parse arguments, run, print the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--blobs", type=int, default=1_000_000, help="file blobs each client reads")
    ap.add_argument("--port", type=int, default=8791)
    print(json.dumps(asyncio.run(_run(ap.parse_args()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
