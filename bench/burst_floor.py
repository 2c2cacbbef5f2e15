#!/usr/bin/env python3
"""What this machine needs to copy a burst to three local replicas at all (issue 4, burst goal).

The burst scenario of `bench/run.py` writes 20,000 new files (the corpus generator, seed 5000)
and times the last write → 3 replicas converged. Whatever a replicator does, each replica must
create those files on the shared disk; this script measures that floor with tools that only copy:

- `cp -a` of the burst subtree to 3 targets at once, then `sync -f` (the flush), and
- `tar -cf - | tar -xf -` to 3 targets at once, then `sync -f`,

on the same filesystem the benchmark uses (pass `--workdir` on that disk), repeated `--repeat`
times, medians reported. Compare with fleetsync's and lsyncd's burst times from `bench/run.py`:
a goal below this floor cannot be met on this machine by any copying tool.

Usage:  .venv/bin/python bench/burst_floor.py [--files 20000] [--workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from fleetsync.ops.corpus import generate  # noqa: E402


def _copy_three(src: str, targets: list[str], how: str) -> tuple[float, float]:
    """Copy src into each target at once (one process per target), then sync the filesystem;
    returns (seconds until every copy finished, seconds until the flush finished)."""
    for t in targets:
        shutil.rmtree(t, ignore_errors=True)
        os.makedirs(t)
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    procs = []
    for t in targets:
        if how == "cp":
            cmd = f"cp -a {_q(src)} {_q(t)}/"
        else:
            cmd = f"tar -C {_q(os.path.dirname(src))} -cf - {_q(os.path.basename(src))} | tar -C {_q(t)} -xf -"
        procs.append(subprocess.Popen(["sh", "-c", cmd]))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{how} copy failed with exit code {p.returncode}")
    copied = time.monotonic() - t0
    subprocess.run(["sync", "-f", targets[0]], check=True)
    return copied, time.monotonic() - t0


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def main() -> int:
    """Run the measurement and print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--workdir", default=None, help="scratch directory on the benchmark's disk")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    wd = tempfile.mkdtemp(prefix="burst-floor-", dir=a.workdir)
    try:
        src = os.path.join(wd, "burst")
        t0 = time.monotonic()
        generate(src, a.files, seed=5000)
        gen = time.monotonic() - t0
        subprocess.run(["sync"], check=True)
        targets = [os.path.join(wd, f"r{i}") for i in (1, 2, 3)]
        res: dict[str, object] = {"files": a.files, "generate_seconds": round(gen, 2)}
        for how in ("cp", "tar"):
            runs = [_copy_three(src, targets, how) for _ in range(a.repeat)]
            res[f"{how}_x3_copied_seconds"] = [round(c, 2) for c, _ in runs]
            res[f"{how}_x3_flushed_seconds"] = [round(f, 2) for _, f in runs]
            res[f"{how}_x3_flushed_median"] = round(statistics.median(f for _, f in runs), 2)
            print(f"{how} to 3 targets at once: copied / flushed "
                  f"{', '.join(f'{c:.2f}/{f:.2f}' for c, f in runs)} s", flush=True)
        print(json.dumps(res))
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
