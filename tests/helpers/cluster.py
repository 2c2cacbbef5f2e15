"""Run a real fleetsync origin and replicas as subprocesses and wait for them to converge."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import tree

# Clusters currently running; conftest attaches their logs to failing test reports.
ACTIVE: list["Cluster"] = []


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url`` and decode the JSON body (raises on connection errors / non-2xx)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.1) -> Any:
    """Poll cond() until it returns something true (and return that); AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file (empty string if missing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class Proc:
    """One fleetsync subprocess with its stderr/stdout appended to a log file."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, cwd: Path) -> None:
        """Prepare (not start) ``python -m fleetsync *args``."""
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def cmd(self) -> list[str]:
        """Full command line."""
        return [sys.executable, "-m", "fleetsync", *self.args]

    def start(self) -> None:
        """Start the process (in its own session so it is killed as a group)."""
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} already running"
        self.starts += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.time():.3f}: {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          cwd=self.cwd, env=env, start_new_session=True)

    @property
    def pid(self) -> int | None:
        """Process id of the current run."""
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        """True while the process is running."""
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        """Exit status of the last run (None while running or never started)."""
        return None if self.popen is None else self.popen.poll()

    def _mark(self, what: str) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {what} at {time.time():.3f}\n".encode())

    def kill9(self) -> None:
        """SIGKILL the process group (simulated crash) and reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._mark("killed with SIGKILL")

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the group; return the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._mark(f"did not exit {timeout}s after SIGTERM; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
        # Clean up any stray children left in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        rc = self.popen.returncode
        self._mark(f"stopped, exit status {rc}")
        return rc

    def restart(self) -> None:
        """Start the process again with the same arguments (after kill9/terminate)."""
        if self.alive():
            self.terminate()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of this process's log."""
        return tail(self.log_path, lines)


class Node:
    """Paths and process of one cluster member."""

    def __init__(self, name: str, base: Path) -> None:
        """Create ``base/name/{root,state}`` layout."""
        self.name = name
        self.dir = base / name
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.log = self.dir / f"{name}.log"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(exist_ok=True)
        self.port: int | None = None
        self.proc: Proc | None = None

    @property
    def broot(self) -> bytes:
        """Root as bytes."""
        return os.fsencode(self.root)

    @property
    def url(self) -> str:
        """Base HTTP URL of this node's API (needs a listen port)."""
        assert self.port is not None, f"{self.name} has no --listen port"
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    """An origin plus N replicas, each with its own root, state dir and log, under ``base``."""

    def __init__(self, base: Path, n_replicas: int = 2, ids: Sequence[str] | None = None,
                 settle: float | None = None, replica_listen: bool = False, anchor: bool = True,
                 origin_args: Sequence[str] = ()) -> None:
        """Lay out directories; with ``anchor`` write a never-deleted ``anchor`` file in the origin root."""
        self.base = Path(base)
        self.ids = list(ids) if ids is not None else [f"r{i + 1}" for i in range(n_replicas)]
        self.settle = settle
        self.origin = Node("origin", self.base)
        self.origin.root.mkdir(exist_ok=True)
        self.origin.port = free_port()
        args = ["origin", "--root", str(self.origin.root), "--state", str(self.origin.state),
                "--listen", f"127.0.0.1:{self.origin.port}"]
        if settle is not None:
            args += ["--settle", str(settle)]
        args += list(origin_args)
        self.origin.proc = Proc("origin", args, self.origin.log, self.base)
        self.replicas: dict[str, Node] = {}
        for rid in self.ids:
            node = Node(rid, self.base)
            rargs = ["replica", "--root", str(node.root), "--state", str(node.state),
                     "--upstream", self.origin.url, "--id", rid]
            if replica_listen:
                node.port = free_port()
                rargs += ["--listen", f"127.0.0.1:{node.port}"]
            node.proc = Proc(rid, rargs, node.log, self.base)
            self.replicas[rid] = node
        if anchor:
            p = self.origin.root / "anchor"
            if not p.exists():
                p.write_bytes(b"anchor: this file is never deleted by the tests\n")
        self.last_status: dict[str, Any] | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def nodes(self) -> list[Node]:
        """Origin first, then replicas."""
        return [self.origin, *self.replicas.values()]

    def start(self) -> "Cluster":
        """Start the origin, wait until it answers, then start the replicas."""
        if self not in ACTIVE:
            ACTIVE.append(self)
        self.origin.proc.start()
        self.wait_origin_up()
        for node in self.replicas.values():
            node.proc.start()
        return self

    def stop(self) -> None:
        """Terminate every process (replicas first); never raises for already-dead processes."""
        for node in [*self.replicas.values(), self.origin]:
            if node.proc is not None:
                try:
                    node.proc.terminate()
                except Exception as e:  # keep stopping the others
                    print(f"error stopping {node.name}: {e!r}", file=sys.stderr)
        if self in ACTIVE:
            ACTIVE.remove(self)

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.starts and not node.proc.alive():
                raise AssertionError(f"{node.name} exited unexpectedly with status {node.proc.returncode()}\n"
                                     + self.logs_report())

    # ----------------------------------------------------------------- status
    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The origin's ``/v1/status`` JSON."""
        st = http_get_json(self.origin.url + "/v1/status", timeout=timeout)
        self.last_status = st
        return st

    def replica_status(self, rid: str, timeout: float = 5.0) -> dict[str, Any]:
        """A replica's own ``/v1/status`` (only when started with ``replica_listen=True``)."""
        return http_get_json(self.replicas[rid].url + "/v1/status", timeout=timeout)

    def replica_entry(self, st: dict[str, Any], rid: str) -> dict[str, Any] | None:
        """The entry for replica ``rid`` in an origin status document."""
        for r in st.get("replicas") or []:
            if r.get("id") == rid:
                return r
        return None

    def bytes_sent(self, rid: str) -> int:
        """Blob payload bytes the origin reports having served to ``rid``."""
        entry = self.replica_entry(self.status(), rid)
        assert entry is not None, f"replica {rid} missing from origin status {self.last_status}"
        return int(entry["bytes_sent"])

    def wait_origin_up(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the origin's status endpoint until it answers."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.origin.proc.alive():
                raise AssertionError(f"origin exited with status {self.origin.proc.returncode()} during start-up\n"
                                     + self.logs_report())
            try:
                return self.status(timeout=2.0)
            except (OSError, ValueError) as e:
                last = e
                time.sleep(0.1)
        raise AssertionError(f"origin did not answer /v1/status within {timeout}s (last error {last!r})\n"
                             + self.logs_report())

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the origin answers and every replica has contacted it (and answers, if listening)."""
        deadline = time.monotonic() + timeout
        self.wait_origin_up(timeout)
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                st = self.status(timeout=2.0)
            except (OSError, ValueError):
                time.sleep(0.1)
                continue
            missing = [rid for rid in self.ids if self.replica_entry(st, rid) is None]
            if not missing:
                for rid, node in self.replicas.items():
                    if node.port is not None:
                        self._wait_replica_api(rid, deadline)
                return st
            time.sleep(0.1)
        raise AssertionError(f"replicas never contacted the origin within {timeout}s; status={st}\n"
                             + self.logs_report())

    def _wait_replica_api(self, rid: str, deadline: float) -> dict[str, Any]:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.replica_status(rid, timeout=2.0)
            except (OSError, ValueError) as e:
                last = e
                time.sleep(0.1)
        raise AssertionError(f"replica {rid} API never answered (last error {last!r})\n" + self.logs_report())

    # ----------------------------------------------------------------- convergence
    def _journal_caught_up(self, st: dict[str, Any]) -> str | None:
        """None when the status document shows the convergence condition, else the reason why not."""
        if st.get("pending") != 0:
            return f"origin pending={st.get('pending')}"
        seq = st.get("seq")
        for rid in self.ids:
            entry = self.replica_entry(st, rid)
            if entry is None:
                return f"replica {rid} absent from origin status"
            if entry.get("applied_seq") != seq:
                return f"replica {rid} applied_seq={entry.get('applied_seq')} != seq={seq}"
        return None

    def compare_trees(self) -> dict[str, list[str]]:
        """Diff every replica tree against the origin tree; {rid: diff lines} for those that differ.

        Also flags ignored upload-temp names present on a replica (other than its own temp files).
        """
        origin_snap = tree.snapshot(self.origin.root)
        out: dict[str, list[str]] = {}
        for rid, node in self.replicas.items():
            ignored: list[bytes] = []
            snap = tree.snapshot(node.root, ignored_out=ignored)
            lines = tree.diff(origin_snap, snap, "origin", rid)
            leaked = [p for p in ignored if not tree.is_replica_temp(os.path.basename(p))]
            lines += [f"{rid} contains an ignored upload-temp name: {p!r}" for p in leaked[:10]]
            if lines:
                out[rid] = lines
        return out

    def wait_converged(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the convergence condition and equal trees; AssertionError with diff + logs on timeout."""
        deadline = time.monotonic() + timeout
        reason = "never polled"
        diffs: dict[str, list[str]] = {}
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                st = self.status()
                r1 = self._journal_caught_up(st)
                if r1 is not None:
                    reason = r1
                    time.sleep(0.2)
                    continue
                time.sleep(0.3)
                st2 = self.status()
            except (OSError, ValueError) as e:
                reason = f"status request failed: {e!r}"
                time.sleep(0.3)
                continue
            r2 = self._journal_caught_up(st2)
            if r2 is not None or st2.get("seq") != st.get("seq"):
                reason = r2 or f"seq moved {st.get('seq')} -> {st2.get('seq')}"
                continue
            diffs = self.compare_trees()
            if not diffs:
                return st2
            reason = "status says caught up but trees differ"
            time.sleep(0.3)
        self._check_alive()
        msg = [f"cluster did not converge within {timeout}s: {reason}",
               f"last origin status: {json.dumps(self.last_status, indent=None)}"]
        if not diffs:
            diffs = self.compare_trees()
        for rid, lines in diffs.items():
            msg.append(f"--- tree diff origin vs {rid}:")
            msg.extend("    " + ln for ln in lines)
        msg.append(self.logs_report())
        raise AssertionError("\n".join(msg))

    # ----------------------------------------------------------------- diagnostics
    def logs_report(self, lines: int = 40) -> str:
        """Tail of each process's log, labelled, for failure messages."""
        parts = []
        for node in self.nodes:
            parts.append(f"----- {node.name} log ({node.log}), last {lines} lines:\n{tail(node.log, lines)}")
        return "\n".join(parts)


@contextlib.contextmanager
def running_cluster(base: Path, **kwargs: Any) -> Iterator[Cluster]:
    """Context manager: build, start and wait for a cluster; always stop it on exit."""
    c = Cluster(base, **kwargs)
    try:
        c.start()
        c.wait_ready()
        yield c
    finally:
        c.stop()


ClusterFactory = Callable[..., Cluster]
"""Type of the ``make_cluster`` fixture: ``make_cluster(n_replicas=2, **Cluster kwargs) -> Cluster``."""
