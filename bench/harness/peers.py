"""The peers fleetsync is compared with: `rsync -a --delete` pushed to N dirs in sequence, and lsyncd."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import Any

from harness.util import log, now, proc_status

RSYNC_STATS = {
    "files": r"Number of files: ([\d,]+)",
    "regular_transferred": r"Number of regular files transferred: ([\d,]+)",
    "deleted": r"Number of deleted files: ([\d,]+)",
    "total_size": r"Total file size: ([\d,]+)",
    "literal": r"Literal data: ([\d,]+)",
    "bytes_sent": r"Total bytes sent: ([\d,]+)",
    "bytes_received": r"Total bytes received: ([\d,]+)",
}


def missing_tools(peers: list[str]) -> list[str]:
    """Debian packages needed for the chosen peers that are not installed."""
    need = []
    if shutil.which("rsync") is None:
        need.append("rsync")  # fleetsync's side also uses nothing else, but every peer needs rsync
    if any(p.startswith("lsyncd") for p in peers) and shutil.which("lsyncd") is None:
        need.append("lsyncd")
    return need


def run_rsync(args: list[str]) -> dict[str, Any]:
    """Run one rsync; returns wall seconds, exit code, parsed --stats and peak RSS of its processes."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = now()
        p = subprocess.Popen(["rsync", *args], stdout=out, stderr=err)
        # wait4 gives the rusage of rsync and the helper processes it forked and reaped (ru_maxrss = max).
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # interrupted: do not leave rsync running behind us
            p.kill()
            p.wait()
            raise
        dt = now() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        etext = err.read().decode(errors="replace")
    stats = {}
    for k, rx in RSYNC_STATS.items():
        m = re.search(rx, text)
        if m:
            stats[k] = int(m.group(1).replace(",", ""))
    return {"seconds": dt, "rc": p.returncode, "stats": stats, "maxrss": ru.ru_maxrss * 1024,
            "stderr": etext[-2000:]}


def rsync_push(src: str, dsts: list[str], *, delete: bool = True, sync: bool = True) -> dict[str, Any]:
    """`rsync -a [--delete] --stats SRC/ DST/` to each dst in sequence (as a master pushes), then sync(1)."""
    t0 = now()
    runs = []
    for d in dsts:
        os.makedirs(d, exist_ok=True)
        args = ["-a", "--stats"] + (["--delete"] if delete else []) + [src.rstrip("/") + "/", d.rstrip("/") + "/"]
        runs.append(run_rsync(args))
    t_rsync = now() - t0
    t_sync = 0.0
    if sync:
        t1 = now()
        os.sync()
        t_sync = now() - t1
    return {"seconds": now() - t0, "rsync_seconds": t_rsync, "sync_seconds": t_sync,
            "per_target": [r["seconds"] for r in runs], "rc": [r["rc"] for r in runs],
            "ok": all(r["rc"] == 0 for r in runs),
            "bytes_sent": sum(r["stats"].get("bytes_sent", 0) for r in runs),
            "bytes_received": sum(r["stats"].get("bytes_received", 0) for r in runs),
            "maxrss": max(r["maxrss"] for r in runs), "stats": [r["stats"] for r in runs],
            "stderr": [r["stderr"] for r in runs if r["rc"] != 0]}


def lua_str(s: str) -> str:
    """A Lua string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Lsyncd:
    """lsyncd in the foreground (-nodaemon) with default.rsync from SOURCE to local target dirs."""

    def __init__(self, workdir: str, label: str, source: str, targets: list[str], delay: float | None) -> None:
        self.label = label
        self.source = source
        self.targets = targets
        self.delay = delay
        self.dir = os.path.join(workdir, "logs")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, f"{label}.conf.lua")
        self.logfile = os.path.join(self.dir, f"{label}.log")
        self.statusfile = os.path.join(self.dir, f"{label}.status")
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> str:
        """Write the Lua config; returns its text."""
        lines = ["settings {", f"  logfile = {lua_str(self.logfile)},", f"  statusFile = {lua_str(self.statusfile)},",
                 "  statusInterval = 1,", "  nodaemon = true,", "}"]
        for t in self.targets:
            lines += ["sync {", "  default.rsync,", f"  source = {lua_str(self.source)},", f"  target = {lua_str(t)},"]
            if self.delay is not None:
                lines.append(f"  delay = {self.delay:g},")
            lines += ["  rsync = { archive = true },", "}"]
        text = "\n".join(lines) + "\n"
        with open(self.config, "w") as f:
            f.write(text)
        return text

    def _log_text(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 3600.0) -> float:
        """Start lsyncd and wait until every target's startup sync finished; returns seconds taken."""
        self.write_config()
        if os.path.exists(self.logfile):
            os.rename(self.logfile, self.logfile + f".{int(time.time())}")
        t0 = now()
        out = open(os.path.join(self.dir, f"{self.label}.stdout"), "ab")
        self.proc = subprocess.Popen(["lsyncd", "-nodaemon", self.config], stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while True:
            text = self._log_text()
            done = len(re.findall(r"Startup of .* finished", text))
            if done >= len(self.targets):
                return now() - t0
            if self.proc.poll() is not None:
                why = " / ".join(self.errors()) or "no error logged"
                raise RuntimeError(f"lsyncd exited with {self.proc.returncode} during startup: {why} "
                                   f"(fs.inotify.max_user_watches is "
                                   f"{open('/proc/sys/fs/inotify/max_user_watches').read().strip()}); "
                                   f"see {self.logfile}")
            if now() - t0 > timeout:
                raise RuntimeError(f"lsyncd startup did not finish within {timeout:.0f}s")
            time.sleep(0.05)

    def alive(self) -> bool:
        """True while the lsyncd process runs."""
        return self.proc is not None and self.proc.poll() is None

    def vmhwm(self) -> int | None:
        """Peak RSS of the lsyncd process itself (not its rsync children)."""
        return proc_status(self.proc.pid, "VmHWM") if self.proc else None

    def overflows(self) -> int:
        """How many inotify overflows lsyncd logged."""
        return self._log_text().count("OVERFLOW")

    def errors(self) -> list[str]:
        """Error lines from the log."""
        return [ln for ln in self._log_text().splitlines() if "Error" in ln][-10:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # lsyncd's rsync children are in its session; make sure none is left behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


# -- convergence of plain directories (peers have no status endpoint) ---------------------------------
Expected = dict[bytes, "tuple[int, int, int] | None"]


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    """What rsync -a reproduces and a poll can check cheaply: (size, mtime_ns, mode)."""
    return (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))


def expected_for(root: str, rels: list[bytes], absent: list[bytes] = ()) -> Expected:
    """The state targets must reach for these paths: stat keys of files present in root, None for absent ones."""
    rootb = os.fsencode(root)
    out: Expected = {}
    for p in absent:
        out[p] = None
    for p in rels:
        try:
            out[p] = stat_key(os.lstat(os.path.join(rootb, p)))
        except FileNotFoundError:
            out[p] = None
    return out


def wait_match(expected: Expected, targets: list[str], *, t_ref: float, timeout: float, poll: float = 0.01,
               alive: Any = None) -> tuple[float, dict[str, float]]:
    """Poll target dirs until every expected path has its expected stat key (or is absent);
    returns (monotonic time all matched, per-target seconds after t_ref).

    A path that matched is not re-checked (targets only move towards the source); the caller verifies
    the whole tree with the fingerprint afterwards."""
    remaining = {t: dict(expected) for t in targets}
    done_at: dict[str, float] = {}
    last_log = now()
    while True:
        for t in targets:
            if t in done_at:
                continue
            tb = os.fsencode(t)
            rem = remaining[t]
            for p in list(rem):
                want = rem[p]
                try:
                    got = stat_key(os.lstat(os.path.join(tb, p)))
                except FileNotFoundError:
                    got = None
                if got == want:
                    del rem[p]
            if not rem:
                done_at[t] = now()
        if len(done_at) == len(targets):
            return max(done_at.values()), {t: v - t_ref for t, v in done_at.items()}
        tt = now()
        if tt - t_ref > timeout:
            left = {os.path.basename(t): len(r) for t, r in remaining.items()}
            raise TimeoutError(f"targets did not converge within {timeout:.0f}s; paths still differing: {left}")
        if alive is not None and not alive():
            raise RuntimeError("the sync process exited while waiting")
        if tt - last_log > 10:
            last_log = tt
            log(f"    waiting: paths still differing " + ", ".join(
                f"{os.path.basename(t)} {len(r)}" for t, r in remaining.items()))
        time.sleep(poll)
