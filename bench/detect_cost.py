#!/usr/bin/env python3
"""Origin change-detection cost benchmark (issue 3, "Benchmark").

For each tree size N:

1. **Per-round cost.** Generate an N-file corpus, start an origin, wait for the first index, then
   apply `--rounds` change rounds of `--round-size` files (`fleetsync.ops.corpus.mutate`) and
   record what the origin spent on each: /proc/PID/io (syscr, syscw, read_bytes, write_bytes) and
   CPU time (utime+stime of the whole process, all threads). One more round runs under
   `strace -f -c -p PID` for the total syscall count and the top syscalls. The goal is that these
   figures do not grow with N (1M vs 100k within 20%).
2. **Idle CPU.** The origin's CPU over `--idle-seconds` with no changes (and no status polls), then
   again while a neighbour process writes `--noise-rate` files/s outside the root on the same
   filesystem (what a filesystem-wide fanotify mark hears).
3. **Start-up reconcile.** Stop the origin, change `--round-size` files while it is down, restart
   it and time until `scan.running == 0 and pending == 0`, warm and cold cache (drop_caches),
   next to `find ROOT -newer STAMP` and `rsync -a --delete --dry-run -i ROOT/ MIRROR/` on the same
   tree, MIRROR being a copy of the tree taken before the changes.

Waiting for a round to finish is done mostly by watching the origin's CPU counter in /proc (free
for the origin); /v1/status is asked only when the CPU has been quiet for a second, because every
status call costs the origin a `SELECT count(*)` over the manifest (see the report).

Usage:  .venv/bin/python bench/detect_cost.py --sizes 100000,1000000 [--workdir DIR] [--keep]
        .venv/bin/python bench/detect_cost.py --quick
        .venv/bin/python bench/detect_cost.py --combine a.json b.json   (markdown tables from results)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))

from fleetsync.ops.corpus import Corpus, generate, mutate  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "bench"))
from harness.util import free_port, log  # noqa: E402

FLEETSYNC = os.path.join(REPO, ".venv", "bin", "fleetsync")
CLK = os.sysconf("SC_CLK_TCK")
IO_KEYS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes")

_children: list[subprocess.Popen[bytes]] = []


# -- /proc readers -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime+stime of the whole process (the tgid line sums every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io counters (whole process)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


def sample(pid: int) -> dict[str, float]:
    """CPU seconds plus io counters, right now."""
    d: dict[str, float] = dict(proc_io(pid))
    d["cpu"] = cpu_seconds(pid)
    d["t"] = time.monotonic()
    return d


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """b - a for the counters we report."""
    out = {k: b[k] - a[k] for k in IO_KEYS}
    out["cpu_s"] = round(b["cpu"] - a["cpu"], 3)
    out["wall_s"] = round(b["t"] - a["t"], 3)
    return out


def drop_caches() -> None:
    """Flush dirty pages and drop the page, dentry and inode caches (root only)."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def dir_bytes(path: str) -> int:
    """Disk usage of a tree in bytes (du)."""
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def code_version() -> str:
    """The commit the origin runs (plus '+dirty' if src/ has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--short", "--", "src"], capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


# -- origin process ------------------------------------------------------------------------------
class Origin:
    """One `fleetsync origin` child process, observed through /proc and /v1/status."""

    def __init__(self, root: str, state: str, logpath: str, detector: str, reconcile_rate: float,
                 retain: int | None = None) -> None:
        self.root, self.state, self.logpath = root, state, logpath
        self.detector, self.reconcile_rate = detector, reconcile_rate
        self.retain = retain
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.status_calls = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Spawn; returns the monotonic start time."""
        self.code = code_version()
        self.port = free_port()
        args = [FLEETSYNC, "origin", "--root", self.root, "--state", self.state,
                "--listen", f"127.0.0.1:{self.port}", "--detector", self.detector,
                "--reconcile-rate", str(self.reconcile_rate)]
        if self.retain:
            args += ["--retain", str(self.retain)]
        t0 = time.monotonic()
        logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        _children.append(self.proc)
        return t0

    def status(self) -> dict[str, Any] | None:
        """GET /v1/status, or None if it does not answer (yet)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"origin exited with {self.proc.returncode}; see {self.logpath}")
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.conn.request("GET", "/v1/status")
                r = self.conn.getresponse()
                body = r.read()
                self.status_calls += 1
                return json.loads(body) if r.status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return None

    def wait_indexed(self, t0: float, timeout: float, poll: float = 0.5) -> dict[str, Any]:
        """Wait until the start-up index/reconcile is done: scan.running == 0 and pending == 0."""
        first_answer = None
        last_log = 0.0
        while True:
            st = self.status()
            now = time.monotonic()
            if st is not None:
                if first_answer is None:
                    first_answer = now - t0
                if st["scan"]["running"] == 0 and st["pending"] == 0:
                    st["_elapsed"] = now - t0
                    st["_serving_after"] = first_answer
                    return st
                if now - last_log > 30:
                    log(f"  ... {now - t0:.0f}s: seq {st['seq']}, pending {st['pending']}, "
                        f"scan {st['scan']}")
                    last_log = now
            if now - t0 > timeout:
                raise TimeoutError(f"origin did not finish its start-up scan in {timeout}s")
            time.sleep(poll)

    def wait_idle(self, timeout: float = 600.0, quiet: float = 1.0) -> dict[str, Any]:
        """Wait until the origin is idle: CPU quiet for `quiet` s, then pending == 0 and seq stable.

        The CPU counter is read from /proc (costs the origin nothing); status is asked only once
        the CPU is quiet, and the answer must repeat (same seq, pending 0) 0.5 s later.
        """
        t0 = time.monotonic()
        t_end = t0 + timeout
        hist: list[tuple[float, float]] = []
        last_seq: int | None = None
        while time.monotonic() < t_end:
            time.sleep(0.1)
            now = time.monotonic()
            hist.append((now, cpu_seconds(self.pid)))
            hist = [h for h in hist if now - h[0] <= quiet + 0.15]
            # Never quiet for 20 s (fanotify also hears other processes' writes on the filesystem):
            # fall back to asking status every 0.5 s.
            if now - t0 < 20 and (now - hist[0][0] < quiet or hist[-1][1] - hist[0][1] > 0.05):
                continue
            st = self.status()
            if st is None:
                continue
            if st["pending"] == 0 and st["scan"]["running"] == 0 and st["seq"] == last_seq:
                return st
            last_seq = st["seq"] if st["pending"] == 0 else None
            hist = []
            time.sleep(0.5)
        raise TimeoutError("origin did not become idle")

    def db_head(self) -> int:
        """The journal head read straight from origin.db (read-only; costs the origin nothing)."""
        import sqlite3

        conn = sqlite3.connect(f"file:{os.path.join(self.state, 'origin.db')}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    def measured_round(self, apply: Any, timeout: float = 600.0, quiet: float = 1.5,
                       before_confirm: Any = None) -> tuple[dict, dict, dict]:
        """Sample, apply(), wait for the origin to be done, sample again: (before, after, status).

        No status call falls inside the window unless the origin turns out not to be done: the end
        is found from the CPU counter (/proc) and the journal head (read from origin.db), and only
        then confirmed with /v1/status (pending == 0, same seq). Every /v1/status call costs the
        origin a `SELECT count(*)` over the manifest when its 2 s cache is stale, which would
        otherwise add O(N) reads to every round.
        """
        h0 = self.db_head()
        a = sample(self.pid)
        info = apply()
        t0 = time.monotonic()
        extra_status = 0
        hist: list[tuple[float, float, int]] = []
        while time.monotonic() - t0 < timeout:
            time.sleep(0.1)
            now = time.monotonic()
            hist.append((now, cpu_seconds(self.pid), self.db_head()))
            hist = [h for h in hist if now - h[0] <= quiet + 0.15]
            if (now - hist[0][0] < quiet or hist[-1][1] - hist[0][1] > 0.05 or hist[-1][2] != hist[0][2]
                    or hist[-1][2] == h0):
                continue
            b = sample(self.pid)
            if before_confirm is not None:
                before_confirm()  # e.g. detach strace, so the confirming call is not counted
                before_confirm = None
            st = self.status()
            if st is not None and st["pending"] == 0 and st["scan"]["running"] == 0 and st["seq"] == hist[-1][2]:
                st["_extra_status_calls"] = extra_status
                st["_info"] = info
                st["_seq0"] = h0
                return a, b, st
            extra_status += 1  # not done after all: this call is inside the window
            hist = []
        raise TimeoutError("origin did not finish the round")

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- strace ----------------------------------------------------------------------------------------
def traced(pid: int) -> bool:
    """True once every thread of pid has a tracer."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        if int(line.split()[1]) == 0:
                            return False
                        break
    except FileNotFoundError:
        return False
    return True


def parse_strace_c(path: str) -> dict[str, Any]:
    """Total calls and per-syscall calls/errors/seconds from an `strace -c` summary."""
    rows: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            t = line.split()
            if len(t) < 5 or not t[0].replace(".", "", 1).isdigit() or t[-1] == "total":
                continue
            name = t[-1]
            rows[name] = {"calls": int(t[3]), "errors": int(t[4]) if len(t) == 6 else 0, "seconds": float(t[1])}
    total = sum(int(r["calls"]) for r in rows.values())
    top = sorted(rows.items(), key=lambda kv: -kv[1]["calls"])
    return {"total_calls": total, "syscalls": dict(top)}


def strace_round(o: Origin, corpus: Corpus, k: int, seed: int, out: str) -> dict[str, Any]:
    """One change round with `strace -f -c` attached to the origin (no status call while attached)."""
    o.wait_idle()
    time.sleep(2.5)  # let the status entries cache go stale: no count(*) is owed by an earlier call
    sp = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(o.pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _children.append(sp)
    t_end = time.monotonic() + 30
    while not traced(o.pid):
        if time.monotonic() > t_end or sp.poll() is not None:
            raise RuntimeError("strace did not attach")
        time.sleep(0.05)
    time.sleep(0.5)

    def apply() -> dict[str, int]:
        return mutate(corpus, k, seed=seed)

    def detach() -> None:
        sp.send_signal(signal.SIGINT)  # detach: strace writes the summary
        sp.wait(timeout=60)

    _, _, st = o.measured_round(apply, before_confirm=detach)
    res = parse_strace_c(out)
    # 0 unless the origin was not done when first asked (then the round ended after strace detached).
    res["not_done_at_detach"] = st["_extra_status_calls"]
    res["records"] = st["seq"] - st["_seq0"]
    res["mutate"] = st["_info"]
    return res


# -- comparison tools ------------------------------------------------------------------------------
def timed(cmd: list[str]) -> dict[str, Any]:
    """Run a command, count its output lines, time it."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t0
    return {"seconds": round(dt, 2), "lines": p.stdout.count(b"\n"), "rc": p.returncode}


def make_mirror(root: str, mirror: str, mode: str) -> str:
    """A copy of the tree as it is now, for rsync --dry-run: 'cp' (cp -a) or 'sparse'.

    'sparse' recreates every directory and file with the same size, mode and mtime but no data
    (truncate): `rsync -a` without -c compares only size and mtime, so its dry run does exactly the
    same work against it, at a fraction of the disk space.
    """
    if os.path.exists(mirror):
        shutil.rmtree(mirror)
    if mode == "cp":
        subprocess.run(["cp", "-a", root, mirror], check=True)
        return mode
    rootb, mirb = os.fsencode(root), os.fsencode(mirror)
    dirs = []
    for dp, dns, fns in os.walk(rootb):
        rel = os.path.relpath(dp, rootb)
        md = os.path.normpath(os.path.join(mirb, rel))
        os.makedirs(md, exist_ok=True)
        for fn in fns:
            src = os.path.join(dp, fn)
            st = os.lstat(src)
            dst = os.path.join(md, fn)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o7777)
            os.ftruncate(fd, st.st_size)
            os.close(fd)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        dirs.append((dp, md))
    for dp, md in reversed(dirs):
        st = os.lstat(dp)
        os.chmod(md, st.st_mode & 0o7777)
        os.utime(md, ns=(st.st_atime_ns, st.st_mtime_ns))
    return mode


def reconcile(o: Origin, corpus: Corpus, k: int, seed: int, cold: bool, mirror: str | None,
              base: str, timeout: float) -> dict[str, Any]:
    """Stop the origin, change k files, then time find / rsync --dry-run / origin restart."""
    o.stop()
    stamp = os.path.join(base, f"stamp-{seed}")
    with open(stamp, "w"):
        pass
    time.sleep(0.05)
    counts = mutate(corpus, k, seed=seed)
    res: dict[str, Any] = {"cache": "cold" if cold else "warm", "mutate": counts}
    if not cold:
        # Warm everything the three contenders touch.
        timed(["find", o.root, "-newer", stamp])
        if mirror:
            timed(["rsync", "-a", "--delete", "--dry-run", "-i", o.root + "/", mirror + "/"])
    if cold:
        drop_caches()
    res["find"] = timed(["find", o.root, "-newer", stamp])
    log(f"  find -newer ({res['cache']}): {res['find']}")
    if mirror:
        if cold:
            drop_caches()
        res["rsync"] = timed(["rsync", "-a", "--delete", "--dry-run", "-i", o.root + "/", mirror + "/"])
        log(f"  rsync --dry-run ({res['cache']}): {res['rsync']}")
    if cold:
        drop_caches()
    t0 = o.start()
    st = o.wait_indexed(t0, timeout, poll=0.25)
    seq0 = st["seq"]
    res["origin"] = {"code": o.code, "seconds": round(st["_elapsed"], 2),
                     "serving_after_s": round(st["_serving_after"] or 0, 2),
                     "checked": st["scan"]["checked"], "differ": st["scan"]["differ"], "seq": seq0}
    log(f"  origin reconcile ({res['cache']}): {res['origin']}")
    return res


def measure_rounds(o: Origin, corpus: Corpus, args: argparse.Namespace, base: str, n: int,
                   detector: str | None) -> dict[str, Any]:
    """Status-call price, per-round cost, one strace round and idle CPU of a running origin."""
    res: dict[str, Any] = {"detector": detector, "code": getattr(o, "code", "?")}
    tag = f"N={n} [{detector}]"
    o.wait_idle()
    # Cost of one status call that misses the 2 s entries cache (SELECT count(*) over the manifest).
    probes = []
    for _ in range(args.status_probe):
        time.sleep(2.5)
        a = sample(o.pid)
        o.status()
        b = sample(o.pid)
        probes.append(delta(a, b))
    res["status_call"] = {"cpu_ms": round(1000 * _avg([d["cpu_s"] for d in probes]), 1),
                          "syscr": round(_avg([d["syscr"] for d in probes])),
                          "ms": round(1000 * _avg([d["wall_s"] for d in probes]), 1)}
    log(f"{tag}: one uncached /v1/status call costs {res['status_call']}")
    o.wait_idle()

    rounds = []
    for r in range(args.rounds):
        seed = 1000 + 10 * r + len(o.detector)
        a, b, st = o.measured_round(lambda: mutate(corpus, args.round_size, seed=seed))
        d = delta(a, b)
        d.update({"records": st["seq"] - st["_seq0"], "mutate": st["_info"],
                  "status_calls_in_window": st["_extra_status_calls"]})
        rounds.append(d)
        log(f"{tag}: round {r + 1}: cpu {d['cpu_s']}s syscr {d['syscr']} syscw {d['syscw']} "
            f"read_bytes {d['read_bytes']} write_bytes {d['write_bytes']} records {d['records']} "
            f"({d['wall_s']}s, {d['status_calls_in_window']} status calls inside)")
    res["rounds"] = rounds

    if shutil.which("strace"):
        res["strace"] = strace_round(o, corpus, args.round_size, 2000 + len(o.detector),
                                     os.path.join(base, f"strace-{o.detector}.txt"))
        top = list(res["strace"]["syscalls"].items())[:8]
        log(f"{tag}: strace round: {res['strace']['total_calls']} syscalls; top "
            + ", ".join(f"{k} {int(v['calls'])}" for k, v in top))
        o.wait_idle()
    else:
        log("strace not installed: skipping the strace round (apt-get install -y strace)")

    log(f"{tag}: idle CPU over {args.idle_seconds}s (no status polls)")
    a = sample(o.pid)
    time.sleep(args.idle_seconds)
    b = sample(o.pid)
    d = delta(a, b)
    d["cpu_pct"] = round(100 * d["cpu_s"] / d["wall_s"], 3)
    res["idle"] = d
    log(f"{tag}: idle: {d}")
    if args.noise_rate > 0:
        # Idle root, busy neighbour: another process writes files on the same filesystem, outside
        # the root (a filesystem-wide fanotify mark hears them; they must cost the origin ~nothing).
        noise_dir = os.path.join(base, "neighbour")
        log(f"{tag}: idle CPU over {args.idle_seconds}s while a neighbour writes {args.noise_rate:g} files/s "
            f"in {noise_dir}")
        a = sample(o.pid)
        written = neighbour_writes(noise_dir, args.noise_rate, args.idle_seconds)
        b = sample(o.pid)
        d = delta(a, b)
        d["cpu_pct"] = round(100 * d["cpu_s"] / d["wall_s"], 3)
        d["neighbour_files"] = written
        res["idle_noise"] = d
        log(f"{tag}: idle with neighbour writes: {d}")
        shutil.rmtree(noise_dir, ignore_errors=True)
    return res


def neighbour_writes(top: str, rate: float, seconds: float) -> int:
    """Write (create, rewrite, rename, delete) small files under top at `rate` files/s for `seconds`."""
    os.makedirs(top, exist_ok=True)
    t0 = time.monotonic()
    n = 0
    while (el := time.monotonic() - t0) < seconds:
        if n > el * rate:
            time.sleep(min(0.01, seconds - el))
            continue
        d = os.path.join(top, f"d{n % 20}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"f{n % 500}")
        with open(p + ".tmp", "wb") as f:
            f.write(b"x" * (n % 4096))
        os.replace(p + ".tmp", p)
        if n % 10 == 0:
            os.unlink(p)
        n += 1
    return n


# -- one size ----------------------------------------------------------------------------------------
def run_size(n: int, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    base = os.path.join(workdir, f"n{n}")
    root, state, mirror = os.path.join(base, "root"), os.path.join(base, "state"), os.path.join(base, "mirror")
    pkl = os.path.join(base, "corpus.pkl")
    os.makedirs(base, exist_ok=True)
    res: dict[str, Any] = {"n": n, "detector": args.detector, "round_size": args.round_size}
    if args.reuse and os.path.exists(pkl) and os.path.isdir(root):
        with open(pkl, "rb") as f:
            corpus = pickle.load(f)
        log(f"N={n}: reusing corpus in {root} ({len(corpus.files)} files)")
    else:
        for d in (root, state, mirror):
            if os.path.exists(d):
                shutil.rmtree(d)
        log(f"N={n}: generating corpus in {root}")
        t0 = time.monotonic()
        corpus = generate(root, n, seed=1)
        res["generate_s"] = round(time.monotonic() - t0, 1)
        with open(pkl, "wb") as f:
            pickle.dump(corpus, f)
        log(f"N={n}: generated in {res['generate_s']}s")
    if os.path.exists(state) and not args.reuse:
        shutil.rmtree(state)
    res["reused_state"] = os.path.exists(state)
    res["corpus_bytes"] = dir_bytes(root)
    res["dirs"] = len(corpus.dirs)

    detectors = [d for d in args.detector.split(",") if d]
    o = Origin(root, state, os.path.join(base, "origin.log"), detectors[0], args.reconcile_rate, args.retain)
    res["per_detector"] = {}
    try:
        log(f"N={n}: starting origin ({'reconcile of the kept state' if res['reused_state'] else 'first index'}, "
            f"detector {detectors[0]})")
        t0 = o.start()
        st = o.wait_indexed(t0, args.timeout, poll=2.0)
        res["first_index"] = {"seconds": round(st["_elapsed"], 1), "entries": st["entries"], "seq": st["seq"],
                              "cpu_s": round(cpu_seconds(o.pid), 1), "detector": st.get("detector"), "code": o.code}
        log(f"N={n}: first index done: {res['first_index']}")
        for i, det in enumerate(detectors):
            if i:
                o.stop()
                o.detector = det
                log(f"N={n}: restarting origin with detector {det}")
                t0 = o.start()
                st = o.wait_indexed(t0, args.timeout, poll=1.0)
            if not args.skip_rounds:
                res["per_detector"][det] = measure_rounds(o, corpus, args, base, n, st.get("detector"))
        o.detector = detectors[0]

        if not args.skip_reconcile:
            mode = args.mirror
            if mode == "auto":
                free = shutil.disk_usage(base).free
                mode = "cp" if free > 2 * res["corpus_bytes"] + (10 << 30) else "sparse"
            if mode != "none":
                o.stop()
                log(f"N={n}: making the rsync mirror ({mode})")
                t0 = time.monotonic()
                res["mirror"] = {"mode": make_mirror(root, mirror, mode), "seconds": round(time.monotonic() - t0, 1)}
                log(f"N={n}: mirror made in {res['mirror']['seconds']}s")
            res["reconcile"] = []
            for i, cold in enumerate((False, True)):
                log(f"N={n}: start-up reconcile, {'cold' if cold else 'warm'} cache")
                res["reconcile"].append(reconcile(o, corpus, args.round_size, 3000 + i, cold,
                                                  mirror if mode != "none" else None, base, args.timeout))
                o.wait_idle()
    finally:
        o.stop()
        with open(pkl, "wb") as f:
            pickle.dump(corpus, f)
    return res


# -- report ----------------------------------------------------------------------------------------
def _avg(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def per_round(d: dict[str, Any]) -> dict[str, float]:
    """Mean per-round figures of one detector's measurements."""
    rs = d["rounds"]
    out = {k: _avg([r[k] for r in rs]) for k in ("cpu_s", "syscr", "syscw", "read_bytes", "write_bytes")}
    out["syscalls"] = d.get("strace", {}).get("total_calls", float("nan"))
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    """Tables for the results file."""
    rs = sorted(results, key=lambda r: r["n"])
    dets: list[str] = []
    for r in rs:
        dets += [k for k in r["per_detector"] if k not in dets]
    lines = []
    for det in dets:
        have = [r for r in rs if det in r["per_detector"]]
        reported = {r["per_detector"][det].get("detector") for r in have}
        hdr = f"| per 1,000-change round, --detector {det} ({'/'.join(map(str, reported))}) | " + \
            " | ".join(f"N={r['n']:,}" for r in have)
        if len(have) >= 2:
            hdr += f" | ratio {have[-1]['n']:,}/{have[0]['n']:,} | goal"
        lines += [hdr + " |", "|" + "---|" * hdr.count("|")]
        pr = [per_round(r["per_detector"][det]) for r in have]
        for key, label in (("syscalls", "syscalls (strace -f -c, 1 round)"),
                           ("syscr", "syscr (/proc io, mean of rounds)"), ("syscw", "syscw"),
                           ("read_bytes", "read_bytes"), ("write_bytes", "write_bytes"),
                           ("cpu_s", "CPU seconds (utime+stime)")):
            row = f"| {label} | " + " | ".join(f"{p[key]:,.2f}" if key == "cpu_s" else f"{p[key]:,.0f}" for p in pr)
            if len(have) >= 2:
                a, b = pr[0][key], pr[-1][key]
                row += f" | {b / a if a else float('nan'):.2f} | < 1.20"
            lines.append(row + " |")
        lines.append("| CPU ms per /v1/status call | " + " | ".join(
            f"{r['per_detector'][det]['status_call']['cpu_ms']:.1f}" for r in have)
            + (" | | |" if len(have) >= 2 else " |"))
        lines.append("| idle CPU % of one core (goal < 1) | " + " | ".join(
            f"{r['per_detector'][det]['idle']['cpu_pct']:.2f}" for r in have) + (" | | |" if len(have) >= 2 else " |"))
        if all("idle_noise" in r["per_detector"][det] for r in have):
            lines.append("| idle CPU % while a neighbour writes outside the root (goal < 1) | " + " | ".join(
                f"{r['per_detector'][det]['idle_noise']['cpu_pct']:.2f} "
                f"({r['per_detector'][det]['idle_noise']['neighbour_files'] / r['per_detector'][det]['idle_noise']['wall_s']:.0f} files/s)"
                for r in have) + (" | | |" if len(have) >= 2 else " |"))
        lines.append("")
    lines.append("| start-up reconcile after 1,000 changes while down | cache | N | fleetsync origin | "
                 "find -newer | rsync -a --dry-run |")
    lines.append("|---|---|---|---|---|---|")
    for r in rs:
        for rc in r.get("reconcile", []):
            rsync = rc.get("rsync", {}).get("seconds")
            lines.append(f"| | {rc['cache']} | {r['n']:,} | {rc['origin']['seconds']:.1f} s "
                         f"(checked {rc['origin']['checked']:,}) | {rc['find']['seconds']:.1f} s | "
                         + (f"{rsync:.1f} s" if rsync is not None else "not run") + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Machine facts for the report."""
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated tree sizes (files)")
    p.add_argument("--quick", action="store_true", help="sizes 10000,50000")
    p.add_argument("--workdir", default=None, help="where corpora live (default: a new dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and state afterwards")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a corpus and origin state left in --workdir by --keep (no first index)")
    p.add_argument("--detector", default="auto",
                   help="origin --detector; a comma list (auto,inotify) repeats the per-round and idle "
                        "measurements for each on the same corpus (restart, no re-index)")
    p.add_argument("--reconcile-rate", type=float, default=0.0)
    p.add_argument("--retain", type=int, default=None,
                   help="origin --retain (journal records kept). The default (1M) makes only a 1M-file origin "
                        "compact records in every round; the same value for every size (e.g. 50000) compares "
                        "tree sizes at the same journal length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-size", type=int, default=1000)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--noise-rate", type=float, default=200.0,
                   help="files/s a neighbour writes outside the root (same filesystem) during a second idle "
                        "measurement (0: skip it)")
    p.add_argument("--status-probe", type=int, default=3, help="uncached status calls used to price one")
    p.add_argument("--mirror", default="auto", choices=["auto", "cp", "sparse", "none"],
                   help="rsync mirror: cp -a, sparse (same names/sizes/mtimes, no data), none (skip rsync); "
                        "auto = cp if the disk has room for it")
    p.add_argument("--skip-reconcile", action="store_true")
    p.add_argument("--skip-rounds", action="store_true", help="only the start-up reconcile (with --reuse)")
    p.add_argument("--timeout", type=float, default=3600.0, help="max seconds for an index/reconcile")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--combine", nargs="+", default=None, help="print markdown tables from result JSON files")
    args = p.parse_args()

    if args.combine:
        results = []
        for path in args.combine:
            with open(path) as f:
                results += json.load(f)["results"]
        print(markdown(results))
        return 0

    sizes = [10000, 50000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    if not shutil.which("strace") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "strace"], check=False)
    own_workdir = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="fleetsync-detect-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    doc: dict[str, Any] = {"machine": machine(), "command": " ".join([sys.executable] + sys.argv),
                           "workdir": workdir, "results": []}
    try:
        doc["machine"]["df"] = subprocess.run(["df", "-T", workdir], capture_output=True, text=True).stdout
        for n in sizes:
            doc["results"].append(run_size(n, args, workdir))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(doc, f, indent=1)
    finally:
        for c in _children:
            if c.poll() is None:
                c.terminate()
                try:
                    c.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    c.kill()
        if not args.keep:
            for n in sizes:
                shutil.rmtree(os.path.join(workdir, f"n{n}"), ignore_errors=True)
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(doc, indent=1, default=str))
    print()
    print(markdown(doc["results"]))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
