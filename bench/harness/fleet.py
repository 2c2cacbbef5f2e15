"""A fleetsync origin and its replicas as child processes on loopback, observed through /v1/status."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from harness.util import free_port, log, now, proc_status


class NotConverged(Exception):
    """The fleet did not converge within the timeout."""


class StatusClient:
    """GET /v1/status over one persistent loopback connection (reconnects on failure)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> dict[str, Any] | None:
        """The status document, or None if the origin does not answer."""
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.conn.request("GET", "/v1/status")
                r = self.conn.getresponse()
                body = r.read()
                if r.status != 200:
                    return None
                return json.loads(body)
            except (OSError, http.client.HTTPException, ValueError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return None

    def close(self) -> None:
        """Drop the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Profiler:
    """py-spy record attached to running processes (only with --profile)."""

    def __init__(self, out_dir: str, py_spy: str, gil: bool = False) -> None:
        self.out_dir = out_dir
        self.py_spy = py_spy
        #: Only samples of the thread holding the GIL: the Python interpreter's own work, without
        #: time spent in system calls (which release it).
        self.gil = gil
        self.running: list[tuple[subprocess.Popen[bytes], str]] = []
        os.makedirs(out_dir, exist_ok=True)

    def start(self, pid: int, label: str) -> None:
        """Start sampling pid into <out_dir>/<label>.txt (collapsed stacks)."""
        out = os.path.join(self.out_dir, label + ".txt")
        p = subprocess.Popen([self.py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                              "--nonblocking", "--threads", *(["--gil"] if self.gil else []), "-o", out],
                             stdout=subprocess.DEVNULL, stderr=open(out + ".log", "wb"))
        self.running.append((p, out))

    def stop(self) -> list[str]:
        """Stop every recorder (SIGINT makes py-spy write its file); returns the files written."""
        done = []
        for p, out in self.running:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, out in self.running:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if os.path.exists(out):
                done.append(out)
        self.running = []
        return done


class Fleet:
    """An origin on ROOT plus named replicas under workdir, spawned with the venv's fleetsync."""

    def __init__(self, workdir: str, origin_root: str, *, settle: float, poll: float = 0.05,
                 detector: str = "auto") -> None:
        self.workdir = workdir
        self.poll = poll
        self.origin_root = origin_root
        self.settle = settle
        self.detector = detector
        self.port = 0
        self.origin: subprocess.Popen[bytes] | None = None
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}
        self.replica_roots: dict[str, str] = {}
        self.replica_ports: dict[str, int] = {}
        #: Start replicas with -v (debug log: one line per applied batch with its phases).
        self.debug_replicas = False
        #: Start the origin with -v (debug log: one line per committed batch with its phases).
        self.debug_origin = False
        self.logs = os.path.join(workdir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.client: StatusClient | None = None
        self.paused = False
        self.exe = [sys.executable, "-m", "fleetsync"]

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, args: list[str], logname: str) -> subprocess.Popen[bytes]:
        f = open(os.path.join(self.logs, logname), "ab")
        return subprocess.Popen(self.exe + args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        """The origin's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start_origin(self, port: int, timeout: float = 3600.0) -> float:
        """Start the origin and wait until its initial index is committed; returns seconds taken."""
        self.port = port
        self.client = StatusClient(port)
        t0 = now()
        self.origin = self._spawn(["origin", "--root", self.origin_root,
                                   "--state", os.path.join(self.workdir, "origin-state"),
                                   "--listen", f"127.0.0.1:{port}", "--settle", str(self.settle),
                                   "--detector", self.detector, *(["-v"] if self.debug_origin else [])],
                                  "origin.log")
        last_seq, stable_since = -1, None
        while True:
            if self.origin.poll() is not None:
                raise RuntimeError(f"origin exited with {self.origin.returncode}; see {self.logs}/origin.log")
            st = self.client.get()
            # walks: the start-up reconcile of a restarted origin begins after it serves status.
            if st and st.get("pending") == 0 and st.get("seq", 0) > 0 and (st.get("scan") or {}).get("walks", 1) > 0:
                if st["seq"] != last_seq:
                    last_seq, stable_since = st["seq"], now()
                elif now() - stable_since >= self.settle + 0.3:
                    return stable_since - t0
            if now() - t0 > timeout:
                raise NotConverged(f"origin did not finish indexing within {timeout:.0f}s")
            time.sleep(0.05)

    def start_replica(self, name: str) -> float:
        """Spawn a replica with an empty root and state; returns the monotonic spawn time."""
        root = os.path.join(self.workdir, f"fleetsync-{name}")
        state = os.path.join(self.workdir, f"fleetsync-{name}-state")
        self.replica_roots[name] = root
        # Each replica serves its status (stats: batches applied, files written...) on a port of its own.
        self.replica_ports[name] = free_port()
        t0 = now()
        self.replicas[name] = self._spawn(["replica", "--root", root, "--state", state,
                                           "--upstream", self.url, "--id", name,
                                           "--listen", f"127.0.0.1:{self.replica_ports[name]}",
                                           *(["-v"] if self.debug_replicas else [])],
                                          f"replica-{name}.log")
        return t0

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Each replica's `stats` (batches, records, files written...) from its own status."""
        out = {}
        for name, port in self.replica_ports.items():
            c = StatusClient(port)
            st = c.get()
            c.close()
            if st is not None:
                out[name] = st.get("stats") or {}
        return out

    def revive(self) -> list[str]:
        """Restart any fleet process that exited (same root, state and port); returns their names."""
        out = []
        if self.origin is not None and self.origin.poll() is not None:
            out.append(f"origin (exit {self.origin.returncode})")
            self.origin = self._spawn(["origin", "--root", self.origin_root,
                                       "--state", os.path.join(self.workdir, "origin-state"),
                                       "--listen", f"127.0.0.1:{self.port}", "--settle", str(self.settle)],
                                      "origin.log")
            time.sleep(1.0)
        for name, p in list(self.replicas.items()):
            if p.poll() is not None:
                out.append(f"{name} (exit {p.returncode})")
                self.start_replica(name)
        if out:
            log(f"  WARNING: fleetsync process(es) had exited and were restarted: {', '.join(out)}")
        return out

    def pids(self) -> dict[str, int]:
        """Process ids by role name."""
        out = {}
        if self.origin is not None:
            out["origin"] = self.origin.pid
        out.update({n: p.pid for n, p in self.replicas.items()})
        return out

    def check_alive(self) -> None:
        """Raise if a fleet process died."""
        for n, p in [("origin", self.origin), *self.replicas.items()]:
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"fleetsync {n} exited with {p.returncode}; see {self.logs}")

    def pause(self) -> None:
        """SIGSTOP every fleet process (so they cost nothing while a peer tool is measured)."""
        if self.paused:
            return
        for pid in self.pids().values():
            os.kill(pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT every fleet process."""
        if not self.paused:
            return
        for pid in self.pids().values():
            os.kill(pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Terminate all fleet processes (SIGTERM, then SIGKILL after 10s)."""
        self.resume()
        procs = [p for p in [*self.replicas.values(), self.origin] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.client:
            self.client.close()

    # -- observation -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        """The origin's /v1/status document."""
        assert self.client is not None
        return self.client.get()

    def feed_bytes(self, after: int, upto: int, commit_times: list[float] | None = None) -> int:
        """Size of the feed JSON a replica downloads for records after..upto (fetched anonymously,
        after the measurement, so no follower is registered); each record's origin commit time
        (`ts`) is appended to commit_times."""
        total = 0
        while after < upto:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", f"/v1/feed?after={after}&limit={min(upto - after, 5000)}")
                body = conn.getresponse().read()
            finally:
                conn.close()
            total += len(body)
            recs = json.loads(body).get("records", [])
            if not recs:
                break
            if commit_times is not None:
                commit_times.extend(float(r["ts"]) for r in recs if isinstance(r, dict) and "ts" in r)
            after = max(int(r.get("seq", after + 1)) for r in recs) if isinstance(recs[0], dict) else after + len(recs)
        return total

    def vmhwm(self) -> dict[str, int | None]:
        """Peak RSS (VmHWM, bytes) of every fleet process."""
        return {n: proc_status(pid, "VmHWM") for n, pid in self.pids().items()}

    def bytes_sent(self, st: dict[str, Any] | None = None) -> dict[str, int]:
        """bytes_sent per replica id, from the status document."""
        st = st or self.status() or {}
        return {r["id"]: int(r.get("bytes_sent", 0)) for r in st.get("replicas", [])}

    def log_count(self, needle: bytes) -> int:
        """How many times the origin logged needle."""
        try:
            with open(os.path.join(self.logs, "origin.log"), "rb") as f:
                return f.read().count(needle)
        except FileNotFoundError:
            return 0

    def overflow_count(self) -> int:
        """How many inotify queue overflows the origin logged."""
        return self.log_count(b"inotify queue overflow")

    def watch_limit_count(self) -> int:
        """How many times the origin ran out of inotify watches."""
        return self.log_count(b"watch limit reached")

    def wait_converged(self, ids: list[str], *, min_seq: int = 0, t_ref: float | None = None,
                       timeout: float = 600.0, poll: float | None = None,
                       confirm: float | None = None) -> tuple[float, dict[str, Any]]:
        """Wait until pending == 0, seq >= min_seq and every replica in ids applied seq; returns
        (monotonic time the converged state was first seen, status).

        The state must hold, with the same seq, for `confirm` seconds (default settle + 0.3 s) so a
        hint still in flight cannot pass for convergence; the time returned is the first sighting."""
        assert self.client is not None
        confirm = self.settle + 0.3 if confirm is None else confirm
        poll = self.poll if poll is None else poll
        t_ref = now() if t_ref is None else t_ref
        cand_t: float | None = None
        cand_seq = -1
        last_log = now()
        while True:
            st = self.client.get()
            t = now()
            ok = False
            if st is not None:
                reps = {r["id"]: r for r in st.get("replicas", [])}
                ok = (st.get("pending") == 0 and not st.get("paused") and st["seq"] >= min_seq
                      and all(i in reps and reps[i]["applied_seq"] == st["seq"] for i in ids))
                if t - last_log > 10:
                    last_log = t
                    log(f"    waiting: origin seq {st['seq']} pending {st.get('pending')} | " + ", ".join(
                        f"{i} {reps[i]['applied_seq'] if i in reps else '-'}" for i in ids))
            if ok:
                assert st is not None
                if cand_t is None or st["seq"] != cand_seq:
                    cand_t, cand_seq = t, st["seq"]
                elif t - cand_t >= confirm:
                    return cand_t, st
            else:
                cand_t = None
            if t - t_ref > timeout:
                raise NotConverged(f"fleetsync did not converge within {timeout:.0f}s (last status: "
                                   f"{json.dumps(st)[:600] if st else 'unreachable'})")
            self.check_alive()
            time.sleep(poll)
