#!/usr/bin/env python3
"""Bootstrap of an empty replica, A/B: replica variants and `rsync -a`, alternating, one origin.

    .venv/bin/python bench/bootstrap_ab.py --workdir DIR [--files 100000] [--reps 2] VARIANT...

A VARIANT is `rsync`, or `NAME:` (the installed code), or `NAME:VAR=VALUE,VAR=VALUE` (environment
of that replica only, e.g. `old:PYTHONPATH=/path/to/other/checkout/src` or
`w2:FLEETSYNC_WRITERS=2`). The corpus (generated once, kept in DIR/origin) is indexed by one
origin; each run bootstraps a new replica (or rsyncs to a new directory) and is timed until it is
converged and flushed (rsync: then `sync`). The order alternates every repetition.

Nothing is deleted between runs (DIR grows by one tree copy per run; remove it afterwards, then
let the filesystem rest): on ext4 without a journal, as on the machine of BENCHMARKS.md, creating
files next to inodes freed in the last minutes scans past each of them (`recently_deleted()`), and
a run right after a large deletion measured 2-3x slower whatever the tool.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness.fleet import Fleet, Profiler  # noqa: E402
from harness.profsum import summarize  # noqa: E402
from harness.peers import rsync_push  # noqa: E402
from harness.util import cpu_seconds, free_port, log, machine_cpu_seconds, sync_disks, wait_idle  # noqa: E402

from fleetsync.ops.corpus import generate  # noqa: E402


def _tree_bytes(root: str) -> int:
    """Bytes a copy of the tree at root takes on disk (allocated blocks, directories included)."""
    total = 0
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(d, n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, env = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in env.split(",") if kv)


def _phases(logfile: str) -> str:
    try:
        with open(logfile, errors="replace") as f:
            lines = [ln for ln in f if "synchronized with" in ln]
        return lines[-1].rsplit("entries", 1)[-1].strip("; )\n") if lines else ""
    except OSError:
        return ""


def main() -> int:
    """Run the A/B and print each run and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--files", type=int, default=100000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait-idle", type=float, default=60.0)
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="py-spy (raw collapsed stacks) of the origin and each replica run into DIR")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: only samples that hold the GIL (Python's own work, no system calls)")
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    wd = os.path.abspath(a.workdir)
    origin = os.path.join(wd, "origin")
    done = origin + ".done"
    if not os.path.exists(done):
        t = time.time()
        generate(origin, a.files, seed=a.seed, huge_dirs=1 if a.files >= 50000 else 0)
        log(f"corpus of {a.files} files in {time.time() - t:.1f}s")
        open(done, "w").close()
    sync_disks()
    # Every run adds a tree copy and nothing is deleted: check the room for all of them up front
    # (a full disk leaves a replica retrying its bootstrap, and the run waiting, forever).
    tree = _tree_bytes(origin)
    runs = a.reps * len(a.variants)
    free = shutil.disk_usage(wd).free
    if free < tree * runs * 1.1 + (1 << 30):
        print(f"not enough disk in {wd}: {runs} runs need about {tree * runs * 1.1 / 1e9:.0f} GB "
              f"({runs} copies of the {tree / 1e6:,.0f} MB tree, kept until you remove them), "
              f"{free / 1e9:.0f} GB free. Remove earlier runs' copies (everything in it but origin*).")
        return 2
    fleet = Fleet(wd, origin, settle=0.2)
    log(f"origin indexed in {fleet.start_origin(free_port()):.1f}s")
    times: dict[str, list[float]] = {}
    #: CPU seconds the whole machine was busy during each run (every process and kernel thread).
    cpus: dict[str, list[float]] = {}
    tag = f"{os.getpid()}"
    prof = None
    if a.profile:
        spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if not spy:
            print("--profile needs py-spy: make .venv/.installed-bench")
            return 2
        prof = Profiler(a.profile, spy, gil=a.profile_gil)
    try:
        for r in range(a.reps):
            for spec in (a.variants if r % 2 == 0 else a.variants[::-1]):
                name, env = _variant(spec)
                wait_idle(a.wait_idle)
                busy0 = machine_cpu_seconds()
                if name == "rsync":
                    res = rsync_push(origin, [os.path.join(wd, f"rsync-{tag}-{r}")], delete=False, sync=True)
                    if not res["ok"]:
                        raise RuntimeError(f"rsync exited {res['rc']}: {res['stderr']}")
                    dt, extra = res["seconds"], ""
                else:
                    rid = f"b{tag}-{r}-{name}"
                    st0 = fleet.status() or {}
                    o0 = cpu_seconds(fleet.origin.pid) if fleet.origin else None
                    saved = {k: os.environ.get(k) for k in env}
                    os.environ.update(env)
                    try:
                        t0 = fleet.start_replica(rid)
                    finally:
                        for k, v in saved.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
                    pid = fleet.replicas[rid].pid
                    if prof is not None and fleet.origin is not None:
                        prof.start(fleet.origin.pid, f"{rid}-origin")
                        prof.start(pid, f"{rid}-replica")
                    t, _ = fleet.wait_converged([rid], min_seq=st0.get("seq", 0), t_ref=t0, timeout=1800)
                    dt = t - t0
                    o1 = cpu_seconds(fleet.origin.pid) if fleet.origin else None
                    ocpu = f"  origin CPU {o1 - o0:.1f}s" if o0 is not None and o1 is not None else ""
                    extra = f"  replica CPU {cpu_seconds(pid) or 0:.1f}s{ocpu}  {_phases(os.path.join(fleet.logs, f'replica-{rid}.log'))}"
                    if prof is not None:
                        for f in prof.stop():
                            log(f"profile {f}:\n{summarize(f)}")
                    p = fleet.replicas.pop(rid)
                    p.terminate()
                    p.wait(10)
                    sync_disks()
                times.setdefault(name, []).append(dt)
                busy = machine_cpu_seconds() - busy0
                cpus.setdefault(name, []).append(busy)
                log(f"rep {r + 1} {name}: {dt:.2f}s  machine CPU {busy:.1f}s{extra}")
        hwm = fleet.vmhwm().get("origin")
        log(f"origin peak RSS (VmHWM) over these runs: {(hwm or 0) / 1e6:.0f} MB")
    finally:
        fleet.stop()
    print(f"\nbootstrap of {a.files} files, {a.reps} repetitions, alternating order:")
    print("| variant | runs (s) | median (s) | machine CPU, median (s) |")
    print("|---|---|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in xs)} | {statistics.median(xs):.2f} "
              f"| {statistics.median(cpus[name]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
