"""Small helpers: timing, percentiles, /proc readers, machine facts, results files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")
RESULTS = os.path.join(BENCH, "results")

now = time.monotonic


def log(msg: str) -> None:
    """Progress line on stderr, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank-interpolated percentile (p in 0..100) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(xs)


def proc_status(pid: int, key: str) -> int | None:
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in bytes, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process and of its children it has reaped (a replica's bootstrap workers), in
    seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in parts[11:15]) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def lo_bytes() -> int:
    """Bytes transmitted on the loopback interface so far (all processes)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return 0


def sync_disks() -> float:
    """sync(1); returns seconds taken."""
    t = now()
    os.sync()
    return now() - t


def drop_caches() -> None:
    """sync and drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def tree_bytes(root: str) -> tuple[int, int]:
    """(files, bytes) under root."""
    n = b = 0
    for dp, _dn, fn in os.walk(root):
        for x in fn:
            try:
                b += os.lstat(os.path.join(dp, x)).st_size
                n += 1
            except FileNotFoundError:
                pass
    return n, b


def run_out(cmd: list[str]) -> str:
    """stdout of a command, or '' if it fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(workdir: str) -> dict[str, Any]:
    """Facts about the machine and the workdir's filesystem."""
    df = run_out(["df", "-T", workdir]).splitlines()
    dev = fstype = ""
    if len(df) >= 2:
        cols = df[1].split()
        dev, fstype = cols[0], cols[1]
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rot = ""
    base = os.path.basename(dev)
    for cand in (base, base.rstrip("0123456789")):
        p = f"/sys/block/{cand}/queue/rotational"
        if os.path.exists(p):
            rot = "rotational" if open(p).read().strip() == "1" else "non-rotational"
            break
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "workdir": workdir, "device": dev, "fstype": fstype,
            "disk": rot, "df": "\n".join(df),
            "rsync": run_out(["rsync", "--version"]).splitlines()[0] if shutil.which("rsync") else None,
            "lsyncd": (run_out(["lsyncd", "--version"]) or "").splitlines()[0] if shutil.which("lsyncd") else None,
            "inotify_max_queued_events": int(open("/proc/sys/fs/inotify/max_queued_events").read()),
            "inotify_max_user_watches": int(open("/proc/sys/fs/inotify/max_user_watches").read())}


def git_rev() -> str:
    """Current commit of the repo (plus '+dirty' when tracked files have uncommitted changes)."""
    rev = run_out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]) or "unknown"
    if git_dirty():
        rev += "+dirty"
    return rev


def git_dirty() -> list[str]:
    """Tracked files with uncommitted changes (the code under test may differ from the commit)."""
    return [ln[3:] for ln in run_out(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]).splitlines()
            if ln.strip()]


class Results:
    """Appends result records as JSON lines to bench/results/<run_id>.jsonl."""

    def __init__(self, run_id: str, common: dict[str, Any]) -> None:
        os.makedirs(RESULTS, exist_ok=True)
        self.run_id = run_id
        self.path = os.path.join(RESULTS, f"{run_id}.jsonl")
        self.common = common
        self.records: list[dict[str, Any]] = []

    def add(self, **rec: Any) -> dict[str, Any]:
        """Record one measurement: scenario, metric, tool, value, unit, status, plus details."""
        full = {"run_id": self.run_id, "time": _dt.datetime.now().isoformat(timespec="seconds"), **self.common,
                **rec}
        self.records.append(full)
        with open(self.path, "a") as f:
            f.write(json.dumps(full, default=str) + "\n")
        return full


def load_results(path: str) -> list[dict[str, Any]]:
    """Records of one results file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- is the machine ours? (other processes' CPU during a measurement) ---------------------------------
def machine_cpu_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float, str, float]]:
    """pid -> (ppid, utime+stime+cutime+cstime seconds, comm, utime+stime seconds)."""
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        parts = raw.rsplit(")", 1)[1].split()
        own = (int(parts[11]) + int(parts[12])) / tck
        out[int(d)] = (int(parts[1]), own + (int(parts[13]) + int(parts[14])) / tck, comm, own)
    return out


def _own_total(table: dict[int, tuple[int, float, str, float]]) -> float:
    """CPU seconds of this process and every descendant, live or reaped."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    me = os.getpid()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    stack = list(kids.get(me, []))
    while stack:
        p = stack.pop()
        own += table[p][1]
        stack.extend(kids.get(p, []))
    return own


class CpuAudit:
    """CPU used by processes that are not ours between start() and stop()."""

    def start(self) -> None:
        """Begin an interval."""
        self.t0 = now()
        self.table0 = _proc_table()
        self.busy0 = machine_cpu_seconds()
        self.own0 = _own_total(self.table0)

    def stop(self) -> dict[str, Any]:
        """End the interval: wall seconds, foreign CPU seconds, share of the machine, top foreign processes."""
        busy1 = machine_cpu_seconds()
        table1 = _proc_table()
        own1 = _own_total(table1)
        wall = now() - self.t0
        # Kernel threads (writeback, ext4 workers, ...) mostly do our own I/O: not counted as foreign.
        kthreads = sum(v[3] - self.table0[pid][3] for pid, v in table1.items()
                       if (v[0] == 2 or pid == 2) and pid in self.table0)
        foreign = max((busy1 - self.busy0) - (own1 - self.own0) - kthreads, 0.0)
        mine = {os.getpid()}
        kids: dict[int, list[int]] = {}
        for pid, (ppid, *_rest) in table1.items():
            kids.setdefault(ppid, []).append(pid)
        stack = list(kids.get(os.getpid(), []))
        while stack:
            p = stack.pop()
            mine.add(p)
            stack.extend(kids.get(p, []))
        top = []
        for pid, (ppid, _, comm, cpu) in table1.items():
            if pid in mine or ppid == 2 or pid == 2:
                continue
            d = cpu - self.table0[pid][3] if pid in self.table0 else cpu
            if d > 0.5:
                top.append((round(d, 1), pid, comm))
        top.sort(reverse=True)
        return {"wall": wall, "foreign_cpu": foreign, "share": foreign / max(wall * (os.cpu_count() or 1), 1e-9),
                "loadavg": open("/proc/loadavg").read().split()[:3], "top_foreign": top[:5]}


def foreign_cpu_now(window: float = 0.5) -> float:
    """CPUs' worth of work other processes did over the next `window` seconds."""
    a = CpuAudit()
    a.start()
    time.sleep(window)
    return a.stop()["foreign_cpu"] / window


def max_user_watches() -> int:
    """fs.inotify.max_user_watches."""
    with open("/proc/sys/fs/inotify/max_user_watches") as f:
        return int(f.read())


def io_pressure() -> float | None:
    """Share of the last 10 s in which some task waited for I/O (/proc/pressure/io "some avg10"), or None."""
    try:
        with open("/proc/pressure/io") as f:
            for line in f:
                if line.startswith("some "):
                    return float(line.split("avg10=")[1].split()[0]) / 100
    except (OSError, IndexError, ValueError):
        pass
    return None


def wait_idle(max_wait: float, threshold: float = 0.15, min_watches: int = 0,
              io_threshold: float = 0.05) -> tuple[float, float]:
    """Wait (up to max_wait s) until other processes use less than `threshold` CPUs, the disk's
    backlog of earlier writes is worked off (I/O pressure under `io_threshold`, where the kernel
    reports it) and fs.inotify.max_user_watches is at least min_watches; returns (seconds waited,
    last foreign CPU level)."""
    t0 = now()
    level = foreign_cpu_now()

    def busy() -> bool:
        io = io_pressure()
        return level > threshold or (io is not None and io > io_threshold) or max_user_watches() < min_watches

    while busy() and now() - t0 < max_wait:
        time.sleep(1.0)
        level = foreign_cpu_now()
    return now() - t0, level
