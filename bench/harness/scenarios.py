"""The benchmark scenarios: each runs fleetsync and its peers on the same origin tree, in the same run.

Only the tool being measured runs: the fleetsync processes are SIGSTOPped while a peer is measured
(and resumed, then allowed to catch up untimed, before fleetsync is measured again); lsyncd runs only
during its own measurements. Every timed run starts with `sync` (so it does not pay for earlier dirty
pages) and, with --cold, with dropped page caches (bootstrap and round only).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

from fleetsync.ops.corpus import Corpus, generate, mutate
from fleetsync.ops.verify import diff_trees, fingerprint_tree

from harness.fleet import Fleet, NotConverged, Profiler
from harness.peers import Lsyncd, expected_for, rsync_push, stat_key, wait_match
from harness.util import (CpuAudit, Results, cpu_seconds, drop_caches, free_port, io_pressure, log,
                          machine_cpu_seconds, max_user_watches, median, now, percentile, sync_disks, wait_idle)

FLEETSYNC = "fleetsync"
RSYNC = "rsync"
LSYNCD_1 = "lsyncd-d1"
LSYNCD_DEF = "lsyncd-default"
PEERS = [RSYNC, LSYNCD_1, LSYNCD_DEF]
TOOLS = [FLEETSYNC, *PEERS]
TOOL_TITLES = {FLEETSYNC: "fleetsync", RSYNC: "rsync -a --delete ×3",
               LSYNCD_1: "lsyncd delay=1", LSYNCD_DEF: "lsyncd default delay"}
SCENARIOS = ["bootstrap", "round", "latency", "burst", "memory", "egress"]


@dataclass
class Sizes:
    """How big each scenario is."""

    files: int = 100_000
    huge_dirs: int = 1
    changes: int = 1000
    rounds: int = 3
    burst: int = 20_000
    samples: int = 50
    rsync_samples: int = 5
    lsyncd_samples: int = 50
    lsyncd_default_samples: int = 5
    bootstrap_repeat: int = 1
    timeout: float = 900.0

    @classmethod
    def quick(cls) -> "Sizes":
        """Small sizes: the whole suite in about two minutes."""
        return cls(files=5000, huge_dirs=0, changes=200, rounds=1, burst=2000, samples=20, rsync_samples=3,
                   lsyncd_samples=5, lsyncd_default_samples=1, timeout=300.0)


class Failed(Exception):
    """A measurement that must be reported as FAILED (did not converge, or trees differ)."""


def _fp(root: str) -> dict[bytes, tuple]:
    return fingerprint_tree(root)


def _stat_fp(root: str) -> dict[bytes, tuple]:
    """Metadata-only fingerprint (kind, mode, size, mtime / link target): a cheap check between rounds
    on big trees; the full fingerprint_tree (with BLAKE3 of every file) still runs at the end."""
    import stat as st_
    rootb = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    stack = [b""]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(os.path.join(rootb, d) if d else rootb)
        except FileNotFoundError:
            continue
        with it:
            for de in it:
                rel = d + b"/" + de.name if d else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st_.S_ISDIR(st.st_mode):
                    out[rel] = ("d", st_.S_IMODE(st.st_mode))
                    stack.append(rel)
                elif st_.S_ISLNK(st.st_mode):
                    out[rel] = ("l", os.readlink(de.path))
                elif st_.S_ISREG(st.st_mode) and not de.name.startswith(b".fleetsync."):
                    out[rel] = ("f", st_.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


class Bench:
    """State shared by the scenarios of one run: the origin tree, the fleet, the peer target dirs."""

    def __init__(self, args: Any, sizes: Sizes, workdir: str, results: Results) -> None:
        self.args = args
        self.sizes = sizes
        self.wd = workdir
        self.res = results
        self.origin_root = os.path.join(workdir, "origin")
        #: Fleetsync replicas (3 by default, like the peers' targets; --replicas changes it).
        self.replicas = [f"r{i + 1}" for i in range(args.replicas)]
        #: "3 replicas" in metric names (a run with another count measures another metric).
        self.n_replicas = f"{len(self.replicas)} replica{'s' if len(self.replicas) != 1 else ''}"
        self.peer_dirs = [os.path.join(workdir, f"peer-{i}") for i in (1, 2, 3)]
        self.corpus: Corpus | None = None
        self.gen = 0                         # bumped on every change the harness makes to the origin
        self._origin_fp: tuple[int, dict[bytes, tuple]] | None = None
        self.fleet: Fleet | None = None
        self.peers_gen = -1                  # origin generation the peer dirs were last rsynced at
        self.peer_maxrss: dict[str, int] = {}
        self.peers = [p for p in PEERS if p in args.peers]
        self.cold = bool(args.cold)
        self.profiler: Profiler | None = None
        if args.profile:
            self.profiler = Profiler(os.path.join(args.profile_dir, results.run_id), args.py_spy,
                                     gil=args.profile_gil)
        self.done: list[str] = []
        self.origin_index_s: float | None = None
        self.origin_hwm_after_index: int | None = None
        self.hwm_trace: dict[str, dict[str, int | None]] = {}
        #: When the harness last removed a tree (see --rest).
        self.removed_at: float | None = None

    # -- setup -----------------------------------------------------------------------------------
    def ensure_corpus(self) -> None:
        """Generate the origin tree (once per run)."""
        if self.corpus is not None:
            return
        n = self.sizes.files
        log(f"generating corpus: {n} files (seed {self.args.seed}, {self.sizes.huge_dirs} huge dirs) "
            f"in {self.origin_root}")
        t = now()
        self.corpus = generate(self.origin_root, n, seed=self.args.seed, huge_dirs=self.sizes.huge_dirs,
                               size_scale=self.args.size_scale)
        dt = now() - t
        size = sum(os.lstat(os.path.join(os.fsencode(self.origin_root), p)).st_size for p in self.corpus.files)
        log(f"  {len(self.corpus.files)} files, {len(self.corpus.dirs)} dirs, {size / 1e6:.0f} MB in {dt:.1f}s")
        sync_disks()
        self.res.add(scenario="setup", metric="corpus", tool="-", value=dt, unit="s", status="ok",
                     detail={"files": len(self.corpus.files), "dirs": len(self.corpus.dirs), "bytes": size,
                             "seed": self.args.seed, "huge_dirs": self.sizes.huge_dirs,
                             "size_scale": self.args.size_scale})

    def ensure_origin(self) -> Fleet:
        """Start the fleetsync origin on the tree (its initial index is timed and recorded)."""
        self.ensure_corpus()
        if self.fleet is None:
            self.fleet = Fleet(self.wd, self.origin_root, settle=self.args.settle, poll=self.args.poll,
                               detector=self.args.detector)
            self.fleet.debug_replicas = self.args.debug_replicas
            self.fleet.debug_origin = self.args.debug_origin
            log("starting fleetsync origin (initial index)")
            dt = self.fleet.start_origin(free_port(), timeout=self.sizes.timeout * 4)
            self.origin_index_s = dt
            hwm = self.fleet.vmhwm()["origin"]
            self.origin_hwm_after_index = hwm
            st = self.fleet.status() or {}
            log(f"  origin indexed {st.get('entries')} entries in {dt:.1f}s (seq {st.get('seq')}, "
                f"peak RSS {(hwm or 0) / 1e6:.0f} MB)")
            self.res.add(scenario="setup", metric="origin initial index", tool=FLEETSYNC, value=dt, unit="s",
                         status="ok", detail={"entries": st.get("entries"), "seq": st.get("seq"), "vmhwm": hwm})
        self.fleet.resume()
        return self.fleet

    def ensure_fleet(self) -> Fleet:
        """Origin plus the replicas (r1..r3 by default), bootstrapped and converged (untimed)."""
        fleet = self.ensure_origin()
        missing = [r for r in self.replicas if r not in fleet.replicas]
        if missing:
            log(f"starting fleetsync replicas {', '.join(missing)} (bootstrap, untimed)")
            t0 = now()
            for r in missing:
                fleet.start_replica(r)
            t, _ = fleet.wait_converged(self.replicas, t_ref=t0, timeout=self.sizes.timeout * 4)
            log(f"  converged after {t - t0:.1f}s")
            diffs = self.verify_fleet("replica setup", last=False)
            if diffs:
                raise RuntimeError("fleetsync replicas differ from the origin after their bootstrap:\n"
                                   + "\n".join(diffs))
            self.note_hwm("replica setup")
        return fleet

    def catch_up(self) -> None:
        """Resume the fleet and wait (untimed) until it applied what changed while it was paused."""
        fleet = self.ensure_fleet()
        fleet.resume()
        dead = fleet.revive()
        if dead:
            self.res.add(scenario="setup", metric="fleetsync processes restarted", tool=FLEETSYNC,
                         value=len(dead), unit="", status="ok", detail={"exited": dead, "after": list(self.done)})
        t0 = now()
        fleet.wait_converged(self.replicas, t_ref=t0, timeout=self.sizes.timeout * 2)
        dt = now() - t0
        if dt > 2:
            log(f"  fleetsync caught up with the peers' changes in {dt:.1f}s (untimed)")
            self.note_hwm("catch-up")

    def ensure_peers(self) -> None:
        """Peer target dirs equal to the origin (rsync, untimed)."""
        self.ensure_corpus()
        if self.peers_gen == self.gen or not self.peers:
            return
        if self.fleet:
            self.fleet.pause()
        log("rsync of the peer target dirs (setup, untimed)")
        r = rsync_push(self.origin_root, self.peer_dirs, delete=True, sync=True)
        if not r["ok"]:
            raise RuntimeError(f"rsync setup failed: {r['stderr']}")
        self._note_rsync_rss(r)
        self.peers_gen = self.gen

    def _note_rsync_rss(self, r: dict[str, Any]) -> None:
        self.peer_maxrss[RSYNC] = max(self.peer_maxrss.get(RSYNC, 0), r["maxrss"])

    # -- verification ----------------------------------------------------------------------------
    def origin_fp(self) -> dict[bytes, tuple]:
        """Fingerprint of the origin tree (cached until the harness changes it)."""
        if self._origin_fp is None or self._origin_fp[0] != self.gen:
            self._origin_fp = (self.gen, fingerprint_tree(self.origin_root))
        return self._origin_fp[1]

    def full_each(self) -> bool:
        """Full fingerprints after every round (else metadata per round, full after the last)."""
        v = self.args.verify
        return v == "each" or (v == "auto" and self.sizes.files <= 100_000)

    def verify_step(self, roots: list[str], last: bool) -> list[str]:
        """Full fingerprint comparison, or the metadata-only one between rounds (see full_each)."""
        if last or self.full_each():
            return self.verify(roots)
        return self.quick_verify(roots)

    def quick_verify(self, roots: list[str]) -> list[str]:
        """Metadata-only comparison of roots with the origin."""
        t = now()
        todo = [self.origin_root, *roots]
        with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1)) as ex:
            fps = list(ex.map(_stat_fp, todo))
        want = fps.pop(0)
        out = []
        for root, got in zip(roots, fps):
            d = diff_trees(want, got, limit=10)
            if d:
                out.append(f"{os.path.basename(root)} differs from the origin (metadata):")
                out += ["    " + x for x in d]
        log(f"  verify (metadata) {', '.join(os.path.basename(r) for r in roots)}: "
            f"{'identical' if not out else 'DIFFERENT'} ({len(want)} entries, {now() - t:.1f}s)")
        return out

    def verify(self, roots: list[str]) -> list[str]:
        """Compare each root with the origin (fingerprints: paths, kinds, modes, sizes, mtimes, BLAKE3);
        returns difference lines (empty when all are identical). With --verify meta, metadata only."""
        if self.args.verify == "meta":
            return self.quick_verify(roots)
        t = now()
        todo = list(roots)
        need_origin = self._origin_fp is None or self._origin_fp[0] != self.gen
        if need_origin:
            todo.insert(0, self.origin_root)
        workers = min(len(todo), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers) as ex:
            fps = list(ex.map(_fp, todo))
        if need_origin:
            self._origin_fp = (self.gen, fps.pop(0))
        want = self._origin_fp[1]  # type: ignore[index]
        out = []
        for root, got in zip(roots, fps):
            d = diff_trees(want, got, limit=10)
            if d:
                out.append(f"{os.path.basename(root)} differs from the origin ({len(want)} vs {len(got)} entries):")
                out += ["    " + x for x in d]
        log(f"  verify {', '.join(os.path.basename(r) for r in roots)}: "
            f"{'identical' if not out else 'DIFFERENT'} ({len(want)} entries, {now() - t:.1f}s)")
        return out

    def verify_fleet(self, what: str, last: bool = True) -> list[str]:
        """Verify the fleetsync replicas."""
        assert self.fleet is not None
        return self.verify_step([self.fleet.replica_roots[r] for r in self.replicas], last)

    # -- helpers ---------------------------------------------------------------------------------
    def before_timed(self) -> None:
        """Flush earlier writes (untimed); drop caches with --cold; wait for other processes on the
        machine to quiet down (--wait-idle); start auditing foreign CPU for the measurement."""
        sync_disks()
        rest = getattr(self.args, "rest", 0.0)
        if rest > 0 and self.removed_at is not None and (left := self.removed_at + rest - now()) > 0:
            log(f"  resting {left:.0f}s after the last removal (--rest: new files would scan past freed inodes)")
            time.sleep(left)
        if self.args.wait_idle > 0:
            waited, level = wait_idle(self.args.wait_idle, min_watches=self.watches_needed())
            if waited > 1:
                io = io_pressure()
                log(f"  waited {waited:.0f}s for the machine to be idle (other processes now at "
                    f"{level * 100:.0f}% of a CPU" + (f", I/O pressure {io * 100:.0f}%)" if io is not None else ")"))
        if self.cold:
            drop_caches()
        if getattr(self, "_audit", None) is None:  # one audit spans all repetitions until recorded
            self._audit = CpuAudit()
            self._audit.start()
            self._audit_result = None

    def watches_needed(self) -> int:
        """inotify watches this run needs at most (origin plus 3 lsyncd syncs, burst included), with margin."""
        return ((self.sizes.files + self.sizes.burst) // 400 + 100) * 5

    def audit_result(self) -> dict[str, Any] | None:
        """Foreign CPU since before_timed() (computed once per measurement)."""
        if getattr(self, "_audit_result", None) is None and getattr(self, "_audit", None) is not None:
            self._audit_result = self._audit.stop()
            self._audit = None
            if self._audit_result["share"] > 0.10:
                log(f"  WARNING: other processes used {self._audit_result['share'] * 100:.0f}% of the machine "
                    f"during this measurement (top {self._audit_result['top_foreign']})")
        return getattr(self, "_audit_result", None)

    def seed(self, tool: str, i: int, base: int = 1000) -> int:
        """Deterministic seed per tool and repetition."""
        return base + 100 * TOOLS.index(tool) + i

    def round_seed(self, i: int, base: int = 1000) -> int:
        """The same seed for every tool's i-th round (same mix and new-file sizes, as far as the
        generator's random stream stays aligned on the slightly different trees)."""
        return base + i

    def snapshot(self) -> dict[bytes, tuple[tuple[int, int, int], int]]:
        """(stat key, inode) of every corpus file, taken before a round (untimed)."""
        assert self.corpus is not None
        rootb = os.fsencode(self.origin_root)
        out = {}
        for p in self.corpus.files:
            st = os.lstat(os.path.join(rootb, p))
            out[p] = (stat_key(st), st.st_ino)
        return out

    def round_delta(self, pre: dict[bytes, tuple[tuple[int, int, int], int]]) -> tuple[dict, dict[str, int]]:
        """What a round changed: (expected target state per changed path, facts) where facts has
        changed_bytes = bytes of new and modified files (what a replica must receive at least)."""
        assert self.corpus is not None
        rootb = os.fsencode(self.origin_root)
        post = {}
        for p in self.corpus.files:
            st = os.lstat(os.path.join(rootb, p))
            post[p] = (stat_key(st), st.st_ino)
        # A rename keeps inode, size and mtime; ext4 reuses freed inodes for new files, so the inode
        # alone would count some new files as renames.
        gone_inos = {(ino, key) for p, (key, ino) in pre.items() if p not in post}
        exp: dict[bytes, Any] = {}
        facts = {"changed_bytes": 0, "new": 0, "modified": 0, "renamed": 0, "deleted": 0}
        for p, (key, ino) in post.items():
            old = pre.get(p)
            if old is not None and old[0] == key:
                continue
            exp[p] = key
            if old is not None:
                facts["modified"] += 1
                facts["changed_bytes"] += key[0]
            elif (ino, key) in gone_inos:
                facts["renamed"] += 1
            else:
                facts["new"] += 1
                facts["changed_bytes"] += key[0]
        for p in pre:
            if p not in post:
                exp[p] = None
        facts["deleted"] = sum(1 for p in pre if p not in post) - facts["renamed"]
        return exp, facts

    def trace_hwm(self, label: str) -> None:
        """Log and keep the fleet's peak RSS after a scenario."""
        self._audit = None
        self._audit_result = None
        self.note_hwm(label)

    def note_hwm(self, label: str) -> None:
        """Log and keep the fleet's peak RSS so far under label (the phase just finished)."""
        if self.fleet is None:
            return
        h = self.fleet.vmhwm()
        self.hwm_trace[label] = h
        log(f"  fleetsync peak RSS after {label}: " + ", ".join(f"{n} {(v or 0) / 1e6:.0f} MB" for n, v in h.items()))

    def record(self, scenario: str, metric: str, tool: str, value: float | None, unit: str, *,
               status: str = "ok", **detail: Any) -> None:
        """Append one result."""
        a = self.audit_result()
        if a is not None:
            detail["foreign_cpu_share"] = round(a["share"], 3)
            detail["foreign_top"] = a["top_foreign"]
        self.res.add(scenario=scenario, metric=metric, tool=tool, value=value, unit=unit, status=status,
                     n_files=self.sizes.files, cold=self.cold, settle=self.args.settle,
                     profiled=self.profiler is not None and tool == FLEETSYNC, detail=detail)

    def fail(self, scenario: str, metrics: list[tuple[str, str]], tool: str, err: Exception) -> None:
        """Record FAILED for every metric of a tool's measurement."""
        log(f"  {tool}: FAILED: {err}")
        for metric, unit in metrics:
            self.record(scenario, metric, tool, None, unit, status="FAILED", error=str(err)[:2000])

    def profile_start(self, label: str, names: list[str]) -> None:
        """Attach py-spy to fleet processes (with --profile)."""
        if self.profiler and self.fleet:
            pids = self.fleet.pids()
            for n in names:
                if n in pids:
                    self.profiler.start(pids[n], f"{label}-{n}")

    def profile_stop(self) -> None:
        """Stop py-spy and log where the profiles are."""
        if self.profiler:
            for f in self.profiler.stop():
                log(f"  profile: {f}")

    def lsyncd_variants(self) -> list[tuple[str, float | None]]:
        """(tool name, delay) for the lsyncd peers selected."""
        out = []
        if LSYNCD_1 in self.peers:
            out.append((LSYNCD_1, 1.0))
        if LSYNCD_DEF in self.peers:
            out.append((LSYNCD_DEF, None))
        return out

    def start_lsyncd(self, tool: str, delay: float | None) -> Lsyncd:
        """Start lsyncd over the (already synced) peer dirs and wait for its startup sync."""
        self.ensure_peers()
        if self.fleet:
            self.fleet.pause()
        for attempt in range(3):
            ls = Lsyncd(self.wd, tool, self.origin_root, self.peer_dirs, delay)
            try:
                dt = ls.start(timeout=self.sizes.timeout * 2)
                break
            except RuntimeError as e:
                ls.stop()
                if "inotify watches" not in str(e) or attempt == 2:
                    raise
                log(f"  {tool}: {e}; waiting up to 5 min for fs.inotify.max_user_watches to recover")
                t0 = now()
                while max_user_watches() < self.watches_needed() and now() - t0 < 300:
                    time.sleep(2)
        log(f"  {tool}: started (startup sync of 3 targets {dt:.1f}s, untimed)")
        return ls

    def stop_lsyncd(self, tool: str, ls: Lsyncd) -> None:
        """Stop lsyncd, remembering its peak RSS."""
        hwm = ls.vmhwm()
        if hwm:
            self.peer_maxrss[tool] = max(self.peer_maxrss.get(tool, 0), hwm)
        ls.stop()

    # ==========================================================================================
    # 1. bootstrap
    def bootstrap(self) -> None:
        """An empty replica from the N-file tree, until converged (fleetsync includes its syncfs;
        rsync -a to an empty dir, then sync)."""
        sc, metric = "bootstrap", "time to a complete, flushed copy"
        fleet = self.ensure_origin()
        for rep in range(self.sizes.bootstrap_repeat):
            # fleetsync: a new replica joins.
            name = "r1" if "r1" not in fleet.replicas else f"boot{rep + 1}"
            fleet.resume()
            try:
                self.before_timed()
                st0 = fleet.status() or {}
                self.profile_start("bootstrap", ["origin"])
                t0 = fleet.start_replica(name)
                if self.profiler:
                    time.sleep(0.3)
                    self.profile_start("bootstrap", [name])
                t, st = fleet.wait_converged([name], min_seq=st0.get("seq", 0), t_ref=t0,
                                             timeout=self.sizes.timeout)
                dt = t - t0
                self.profile_stop()
                log(f"  fleetsync bootstrap: {dt:.2f}s")
                diffs = self.verify([fleet.replica_roots[name]])
                sent = fleet.bytes_sent(st).get(name, 0)
                hwm = fleet.vmhwm()
                rstats = fleet.replica_stats().get(name, {})
                if diffs:
                    raise Failed("replica differs from the origin:\n" + "\n".join(diffs))
                self.record(sc, metric, FLEETSYNC, dt, "s", bytes_sent=sent, replica_vmhwm=hwm.get(name),
                            origin_vmhwm=hwm.get("origin"), rep=rep, replica_cpu_s=cpu_seconds(fleet.replicas[name].pid),
                            worker_vmhwm=rstats.get("bootstrap_worker_peak_rss"))
            except (Failed, NotConverged, RuntimeError) as e:
                self.profile_stop()
                self.fail(sc, [(metric, "s")], FLEETSYNC, e)
            if name != "r1":
                p = fleet.replicas.pop(name)
                p.terminate()
                p.wait(10)
                shutil.rmtree(fleet.replica_roots.pop(name), ignore_errors=True)
                shutil.rmtree(os.path.join(self.wd, f"fleetsync-{name}-state"), ignore_errors=True)
                self.removed_at = now()
            # rsync -a to an empty dir, then sync.
            if RSYNC in self.peers:
                fleet.pause()
                target = os.path.join(self.wd, f"rsync-bootstrap-{rep + 1}")
                shutil.rmtree(target, ignore_errors=True)
                try:
                    self.before_timed()
                    r = rsync_push(self.origin_root, [target], delete=False, sync=True)
                    self._note_rsync_rss(r)
                    log(f"  rsync bootstrap: {r['seconds']:.2f}s (rsync {r['rsync_seconds']:.2f}s + "
                        f"sync {r['sync_seconds']:.2f}s)")
                    if not r["ok"]:
                        raise Failed(f"rsync exited {r['rc']}: {r['stderr']}")
                    diffs = self.verify([target])
                    if diffs:
                        raise Failed("copy differs from the origin:\n" + "\n".join(diffs))
                    self.record(sc, metric, RSYNC, r["seconds"], "s", rsync_seconds=r["rsync_seconds"],
                                sync_seconds=r["sync_seconds"], bytes_sent=r["bytes_sent"], maxrss=r["maxrss"],
                                rep=rep)
                except (Failed, RuntimeError) as e:
                    self.fail(sc, [(metric, "s")], RSYNC, e)
                if rep == 0 and not os.path.exists(self.peer_dirs[0]):
                    os.rename(target, self.peer_dirs[0])  # reused as a peer target dir (re-checked by rsync)
                else:
                    shutil.rmtree(target, ignore_errors=True)
                    self.removed_at = now()
                fleet.resume()
        self.done.append("bootstrap")
        self.trace_hwm("bootstrap")

    # ==========================================================================================
    # 2. round (and 6. egress)
    def round(self) -> None:
        """A change round of K files reaching the replicas: time from the last write to all converged."""
        sc = "round"
        m_time = f"{self.sizes.changes}-change round, last write → {self.n_replicas} converged"
        m_egress = "origin egress per round"
        # The peers always push to 3 targets: their ratio keeps the 3.
        m_rel = f"egress ÷ ({len(self.replicas)} × bytes of new+modified files)"
        m_rel_peer = "egress ÷ (3 × bytes of new+modified files)"
        m_wire = "origin egress per round, content + feed JSON (rsync: all protocol bytes)"
        k = self.sizes.changes
        self.ensure_fleet()
        # fleetsync. The peers' target dirs are brought up to date (an untimed rsync) only before
        # their own rounds: each tool's timed rounds follow its own setup. At 1M files that setup
        # writes three tree copies, which would otherwise push the replicas' directories and
        # databases out of memory just before fleetsync's rounds (twelfth session).
        self.catch_up()
        fleet = self.fleet
        assert fleet is not None and self.corpus is not None
        times, egress, lo, counts, rel, wire = [], [], [], [], [], []
        try:
            for i in range(self.sizes.rounds):
                pre = self.snapshot()
                self.before_timed()
                st0 = fleet.status() or {}
                wl0 = fleet.watch_limit_count()
                b0 = fleet.bytes_sent(st0)
                self.profile_start(f"round{i + 1}", ["origin", "r1"])
                cpu0 = {n: cpu_seconds(pid) for n, pid in fleet.pids().items()}
                rs0 = fleet.replica_stats()
                t_first, c_first = now(), time.process_time()
                mutate(self.corpus, k, seed=self.round_seed(i))
                t_last = now()
                self.gen += 1
                t, st = fleet.wait_converged(self.replicas, min_seq=st0["seq"] + 1, t_ref=t_last,
                                             timeout=self.sizes.timeout)
                self.profile_stop()
                cpu = {n: round((cpu_seconds(pid) or 0.0) - (cpu0.get(n) or 0.0), 3)
                       for n, pid in fleet.pids().items()}
                cpu["writer"] = round(time.process_time() - c_first, 3)
                t_last_wall = time.time() - (now() - t_last)
                log(f"    last write at {t_last_wall:.3f}; writes took {t_last - t_first:.3f}s; CPU seconds first write → converged: {cpu}")
                rs1 = fleet.replica_stats()
                b1 = fleet.bytes_sent(st)
                e = sum(b1.get(r, 0) - b0.get(r, 0) for r in self.replicas)
                _, facts = self.round_delta(pre)
                facts["watch_limit_hits"] = fleet.watch_limit_count() - wl0
                facts["cpu_s"] = cpu
                facts["replica_batches"] = {n: rs1[n].get("batches", 0) - rs0.get(n, {}).get("batches", 0) for n in rs1}
                facts["write_s"] = round(t_last - t_first, 3)
                hot0, hot1 = st0.get("hot_blobs") or {}, st.get("hot_blobs") or {}
                if hot1:
                    facts["origin_hot"] = {k: hot1.get(k, 0) - hot0.get(k, 0) for k in ("hits", "misses")}
                    km0, km1 = st0.get("kept_on_miss") or {}, st.get("kept_on_miss") or {}
                    if km1:
                        facts["origin_hot"]["kept_on_miss_hits"] = km1.get("hits", 0) - km0.get("hits", 0)
                log(f"  fleetsync round {i + 1}: {t - t_last:.3f}s, {st['seq'] - st0['seq']} records, "
                    f"egress {e / 1e6:.1f} MB for {facts['changed_bytes'] / 1e6:.1f} MB changed ({facts})")
                diffs = self.verify_fleet("round", last=i == self.sizes.rounds - 1)
                if diffs:
                    raise Failed("replicas differ from the origin:\n" + "\n".join(diffs))
                ts: list[float] = []
                feed = fleet.feed_bytes(st0["seq"], st["seq"], ts)
                facts["feed_json_bytes_per_replica"] = feed
                if ts:
                    # Where the round's time goes: the origin's commits, relative to the last write.
                    facts["origin_commits"] = len(set(ts))
                    facts["origin_last_commit_s"] = round(max(ts) - t_last_wall, 3)
                    log(f"    origin: {facts['origin_commits']} commits, the last {facts['origin_last_commit_s']:.3f}s "
                        f"after the last write; batches applied per replica: {facts['replica_batches']}")
                wire.append(e + len(self.replicas) * feed)
                times.append(t - t_last)
                egress.append(e)
                rel.append(e / max(len(self.replicas) * facts["changed_bytes"], 1))
                lo.append(st["seq"] - st0["seq"])
                counts.append(facts)
            self.record(sc, m_time, FLEETSYNC, median(times), "s", samples=times, records=lo, changes=counts)
            self.record(sc, m_egress, FLEETSYNC, median(egress), "bytes", samples=egress, changes=counts,
                        note=f"bytes_sent deltas summed over {self.n_replicas} (content bytes)")
            self.record(sc, m_wire, FLEETSYNC, median(wire), "bytes", samples=wire,
                        note=f"content bytes_sent plus {len(self.replicas)} x the feed JSON for the round's records")
            self.record(sc, m_rel, FLEETSYNC, median(rel), "x", samples=rel)
        except (Failed, NotConverged, RuntimeError) as e:
            self.profile_stop()
            self.fail(sc, [(m_time, "s"), (m_egress, "bytes"), (m_wire, "bytes"), (m_rel, "x")], FLEETSYNC, e)
        fleet.pause()
        # rsync pushed to the 3 dirs in sequence, then sync.
        if RSYNC in self.peers:
            self.ensure_peers()
            times, egress, details, rel = [], [], [], []
            try:
                for i in range(self.sizes.rounds):
                    pre = self.snapshot()
                    self.before_timed()
                    mutate(self.corpus, k, seed=self.round_seed(i))
                    self.gen += 1
                    r = rsync_push(self.origin_root, self.peer_dirs, delete=True, sync=True)
                    self._note_rsync_rss(r)
                    if not r["ok"]:
                        raise Failed(f"rsync exited {r['rc']}: {r['stderr']}")
                    self.peers_gen = self.gen
                    log(f"  rsync round {i + 1}: {r['seconds']:.3f}s (per target "
                        f"{', '.join(f'{x:.2f}' for x in r['per_target'])}, sync {r['sync_seconds']:.2f}s), "
                        f"sent {r['bytes_sent'] / 1e6:.1f} MB")
                    _, facts = self.round_delta(pre)
                    diffs = self.verify_step(self.peer_dirs, last=i == self.sizes.rounds - 1)
                    if diffs:
                        raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                    times.append(r["seconds"])
                    egress.append(r["bytes_sent"])
                    rel.append(r["bytes_sent"] / max(3 * facts["changed_bytes"], 1))
                    details.append({k2: r[k2] for k2 in ("per_target", "sync_seconds", "bytes_received", "maxrss")}
                                   | {"changes": facts})
                self.record(sc, m_time, RSYNC, median(times), "s", samples=times, runs=details)
                self.record(sc, m_egress, RSYNC, median(egress), "bytes", samples=egress,
                            note="sum over the 3 runs of rsync --stats 'Total bytes sent'")
                self.record(sc, m_wire, RSYNC, median(egress), "bytes", samples=egress,
                            note="rsync's 'Total bytes sent' already counts file lists and protocol")
                self.record(sc, m_rel_peer, RSYNC, median(rel), "x", samples=rel)
            except (Failed, RuntimeError) as e:
                self.fail(sc, [(m_time, "s"), (m_egress, "bytes"), (m_wire, "bytes"), (m_rel_peer, "x")], RSYNC, e)
        # lsyncd: running, watching the origin; a round is written; poll the targets.
        for tool, delay in self.lsyncd_variants():
            ls = None
            times = []
            try:
                ls = self.start_lsyncd(tool, delay)
                for i in range(self.sizes.rounds):
                    pre = self.snapshot()
                    self.before_timed()
                    mutate(self.corpus, k, seed=self.round_seed(i))
                    t_last = now()
                    self.gen += 1
                    exp, _ = self.round_delta(pre)  # while lsyncd waits out its delay
                    t, per = wait_match(exp, self.peer_dirs, t_ref=t_last, timeout=self.sizes.timeout,
                                        alive=ls.alive)
                    log(f"  {tool} round {i + 1}: {t - t_last:.3f}s ({len(exp)} paths changed)")
                    time.sleep(0.5)
                    diffs = self.verify_step(self.peer_dirs, last=i == self.sizes.rounds - 1)
                    if diffs:
                        raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                    self.peers_gen = self.gen
                    times.append(t - t_last)
                self.record(sc, m_time, tool, median(times), "s", samples=times, delay=delay,
                            overflows=ls.overflows())
            except (Failed, RuntimeError, TimeoutError) as e:
                self.fail(sc, [(m_time, "s")], tool, e)
                self.peers_gen = -1
            finally:
                if ls:
                    self.stop_lsyncd(tool, ls)
        self.catch_up()
        self.done.append("round")
        self.trace_hwm("round")

    # ==========================================================================================
    # 3. latency
    def _one_file(self, rel: bytes, i: int) -> bytes:
        rng = random.Random(i)
        data = f"<!-- latency sample {i} {rel.decode()} -->\n".encode() + rng.randbytes(8192)
        with open(os.path.join(os.fsencode(self.origin_root), rel), "wb") as f:
            f.write(data)
        return data

    @staticmethod
    def _wait_content(targets: list[str], rel: bytes, data: bytes, t_ref: float, timeout: float,
                      poll: float = 0.002) -> float:
        """Monotonic time at which rel has exactly `data` in every target (polled by reading it)."""
        left = [os.path.join(os.fsencode(t), rel) for t in targets]
        while True:
            for p in list(left):
                try:
                    with open(p, "rb") as f:
                        if f.read() == data:
                            left.remove(p)
                except FileNotFoundError:
                    pass
            if not left:
                return now()
            if now() - t_ref > timeout:
                raise TimeoutError(f"{rel!r} not readable on {len(left)} target(s) after {timeout:.0f}s")
            time.sleep(poll)

    def latency(self) -> None:
        """One file written on the origin until readable, with the right content, on every replica."""
        sc = "latency"
        metrics = [("p50", "ms"), ("p95", "ms"), ("p99", "ms")]
        self.ensure_fleet()
        lat = f"latency-{int(time.time())}"
        os.makedirs(os.path.join(self.origin_root, lat))
        self.gen += 1
        self.ensure_peers()  # pauses the fleet: peers first, then let fleetsync catch up
        self.catch_up()

        def measure(tool: str, n: int, targets: list[str], push: Callable[[], Any] | None) -> list[float]:
            samples = []
            for i in range(n):
                rel = f"{lat}/{tool}-{i:03d}.html".encode()
                data = self._one_file(rel, self.seed(tool, i))
                t_last = now()
                self.gen += 1
                if push is not None:
                    push()
                t = self._wait_content(targets, rel, data, t_last, timeout=min(self.sizes.timeout, 120))
                samples.append((t - t_last) * 1000)
                time.sleep(random.uniform(0.05, 0.15))
            return samples

        def report(tool: str, samples: list[float], **detail: Any) -> None:
            p = {"p50": percentile(samples, 50), "p95": percentile(samples, 95), "p99": percentile(samples, 99)}
            log(f"  {tool} latency over {len(samples)} samples: p50 {p['p50']:.0f} ms, p95 {p['p95']:.0f} ms, "
                f"p99 {p['p99']:.0f} ms, max {max(samples):.0f} ms")
            for name, unit in metrics:
                self.record(sc, name, tool, p[name], unit, samples=samples, n=len(samples), **detail)

        fleet = self.fleet
        assert fleet is not None
        try:
            self.profile_start("latency", ["origin", "r1"])
            self.before_timed()
            t0 = now()
            st0 = fleet.status() or {}
            samples = measure(FLEETSYNC, self.sizes.samples, [fleet.replica_roots[r] for r in self.replicas], None)
            fleet.wait_converged(self.replicas, min_seq=st0.get("seq", 0), t_ref=t0, timeout=self.sizes.timeout)
            self.profile_stop()
            diffs = self.verify_fleet("latency")
            if diffs:
                raise Failed("replicas differ from the origin:\n" + "\n".join(diffs))
            report(FLEETSYNC, samples)
        except (Failed, NotConverged, RuntimeError, TimeoutError) as e:
            self.profile_stop()
            self.fail(sc, metrics, FLEETSYNC, e)
        fleet.pause()
        if RSYNC in self.peers:
            try:
                self.ensure_peers()
                self.before_timed()

                def push() -> None:
                    r = rsync_push(self.origin_root, self.peer_dirs, delete=True, sync=False)
                    self._note_rsync_rss(r)
                    if not r["ok"]:
                        raise Failed(f"rsync exited {r['rc']}: {r['stderr']}")
                samples = measure(RSYNC, self.sizes.rsync_samples, self.peer_dirs, push)
                self.peers_gen = self.gen
                diffs = self.verify(self.peer_dirs)
                if diffs:
                    raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                report(RSYNC, samples, note="each sample: write, then rsync -a --delete to the 3 dirs in sequence")
            except (Failed, RuntimeError, TimeoutError) as e:
                self.fail(sc, metrics, RSYNC, e)
        for tool, delay in self.lsyncd_variants():
            ls = None
            try:
                ls = self.start_lsyncd(tool, delay)
                n = self.sizes.lsyncd_samples if tool == LSYNCD_1 else self.sizes.lsyncd_default_samples
                self.before_timed()
                samples = measure(tool, n, self.peer_dirs, None)
                time.sleep(0.5)
                diffs = self.verify(self.peer_dirs)
                if diffs:
                    raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                self.peers_gen = self.gen
                report(tool, samples, delay=delay)
            except (Failed, RuntimeError, TimeoutError) as e:
                self.fail(sc, metrics, tool, e)
                self.peers_gen = -1
            finally:
                if ls:
                    self.stop_lsyncd(tool, ls)
        self.catch_up()
        self.done.append("latency")
        self.trace_hwm("latency")

    # ==========================================================================================
    # 4. burst
    def burst(self) -> None:
        """N new files written at once (a new subtree shaped like the corpus) until all replicas
        converge; then the subtree is removed again (propagation of that removal is recorded too)."""
        sc = "burst"
        n = self.sizes.burst
        m_time = f"{n}-file burst, last write → {self.n_replicas} converged"
        m_del = f"removal of the {n}-file burst → {self.n_replicas}"
        self.ensure_fleet()
        self.catch_up()
        fleet = self.fleet
        assert fleet is not None
        rootb = os.fsencode(self.origin_root)

        def write_burst(tool: str) -> tuple[bytes, Corpus, float, float]:
            sub = f"burst-{tool}-{int(time.time())}".encode()
            t0 = now()
            bc = generate(os.path.join(self.origin_root, sub.decode()), n, seed=5000)
            t_last = now()
            self.gen += 1
            return sub, bc, t0, t_last

        def remove(sub: bytes) -> float:
            shutil.rmtree(os.path.join(rootb, sub))
            self.gen += 1
            self.removed_at = now()  # the replicas and peers remove their copies from here on
            return self.removed_at

        # fleetsync
        sub = None
        try:
            self.before_timed()
            st0 = fleet.status() or {}
            ov0 = fleet.overflow_count()
            wl0 = fleet.watch_limit_count()
            self.profile_start("burst", ["origin", "r1"])
            cpu0 = {name: cpu_seconds(pid) for name, pid in fleet.pids().items()}
            busy0, c0 = machine_cpu_seconds(), time.process_time()
            sub, bc, t0, t_last = write_burst(FLEETSYNC)
            t, st = fleet.wait_converged(self.replicas, min_seq=st0["seq"] + 1, t_ref=t_last, timeout=self.sizes.timeout)
            busy = round(machine_cpu_seconds() - busy0, 2)
            cap = round((os.cpu_count() or 1) * (now() - t0), 2)  # CPU-seconds the machine had
            self.profile_stop()
            cpu = {name: round((cpu_seconds(pid) or 0.0) - (cpu0.get(name) or 0.0), 2)
                   for name, pid in fleet.pids().items()}
            cpu["writer"] = round(time.process_time() - c0, 2)
            dt = t - t_last
            ov = fleet.overflow_count() - ov0
            log(f"  fleetsync burst: written in {t_last - t0:.2f}s, converged {dt:.2f}s after the last write "
                f"({st['seq'] - st0['seq']} records, {ov} inotify overflows); CPU seconds first write → "
                f"converged: {cpu}, the whole machine {busy} of {cap}")
            diffs = self.verify_fleet("burst")
            if diffs:
                raise Failed("replicas differ from the origin:\n" + "\n".join(diffs))
            wl = fleet.watch_limit_count() - wl0
            if wl:
                log(f"  WARNING: the origin ran out of inotify watches {wl} times (fs.inotify.max_user_watches)")
            self.record(sc, m_time, FLEETSYNC, dt, "s", write_seconds=t_last - t0, from_first_write=t - t0,
                        records=st["seq"] - st0["seq"], overflows=ov, watch_limit_hits=wl, cpu_s=cpu,
                        machine_cpu_s=busy, machine_cpu_capacity_s=cap)
            st0 = fleet.status() or {}
            t_rm = remove(sub)
            sub = None
            t, st = fleet.wait_converged(self.replicas, min_seq=st0["seq"] + 1, t_ref=t_rm, timeout=self.sizes.timeout)
            log(f"  fleetsync burst removal: {t - t_rm:.2f}s")
            diffs = self.verify_fleet("burst removal")
            if diffs:
                raise Failed("replicas differ from the origin after the removal:\n" + "\n".join(diffs))
            self.record(sc, m_del, FLEETSYNC, t - t_rm, "s", records=st["seq"] - st0["seq"])
        except (Failed, NotConverged, RuntimeError) as e:
            self.profile_stop()
            self.fail(sc, [(m_time, "s")], FLEETSYNC, e)
            if sub is not None:
                remove(sub)
        fleet.pause()
        if RSYNC in self.peers:
            sub = None
            try:
                self.ensure_peers()
                self.before_timed()
                sub, bc, t0, t_last = write_burst(RSYNC)
                r = rsync_push(self.origin_root, self.peer_dirs, delete=True, sync=True)
                self._note_rsync_rss(r)
                if not r["ok"]:
                    raise Failed(f"rsync exited {r['rc']}: {r['stderr']}")
                log(f"  rsync burst: {r['seconds']:.2f}s after the last write")
                diffs = self.verify(self.peer_dirs)
                if diffs:
                    raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                self.record(sc, m_time, RSYNC, r["seconds"], "s", write_seconds=t_last - t0,
                            per_target=r["per_target"], sync_seconds=r["sync_seconds"], bytes_sent=r["bytes_sent"])
                remove(sub)
                sub = None
                r = rsync_push(self.origin_root, self.peer_dirs, delete=True, sync=True)
                self.peers_gen = self.gen
                self.record(sc, m_del, RSYNC, r["seconds"], "s")
            except (Failed, RuntimeError) as e:
                self.fail(sc, [(m_time, "s")], RSYNC, e)
                if sub is not None:
                    remove(sub)
        for tool, delay in self.lsyncd_variants():
            ls = None
            sub = None
            try:
                ls = self.start_lsyncd(tool, delay)
                self.before_timed()
                sub, bc, t0, t_last = write_burst(tool)
                files = [sub + b"/" + p for p in bc.files]
                exp = expected_for(self.origin_root, files)
                t, per = wait_match(exp, self.peer_dirs, t_ref=t_last, timeout=self.sizes.timeout, alive=ls.alive)
                dt = t - t_last
                ov = ls.overflows()
                log(f"  {tool} burst: {dt:.2f}s after the last write (written in {t_last - t0:.2f}s, "
                    f"{ov} inotify overflows)")
                time.sleep(0.5)
                diffs = self.verify(self.peer_dirs)
                if diffs:
                    raise Failed("targets differ from the origin:\n" + "\n".join(diffs))
                self.record(sc, m_time, tool, dt, "s", write_seconds=t_last - t0, overflows=ov, delay=delay)
                t_rm = remove(sub)
                sub = None
                t, _ = wait_match({files[0].split(b"/")[0]: None}, self.peer_dirs, t_ref=t_rm,
                                  timeout=self.sizes.timeout, alive=ls.alive)
                self.record(sc, m_del, tool, t - t_rm, "s")
                self.peers_gen = self.gen
            except (Failed, RuntimeError, TimeoutError) as e:
                self.fail(sc, [(m_time, "s")], tool, e)
                self.peers_gen = -1
                if sub is not None:
                    remove(sub)
            finally:
                if ls:
                    self.stop_lsyncd(tool, ls)
        self.catch_up()
        self.done.append("burst")
        self.trace_hwm("burst")

    # ==========================================================================================
    # 5. memory
    def memory(self) -> None:
        """Peak RSS (VmHWM) of the origin and replica processes at N files, after the scenarios run
        so far (a round is run first if none was)."""
        sc = "memory"
        if "round" not in self.done:
            log("memory: running a change round first so every process has done real work")
            self.round()
        fleet = self.ensure_fleet()
        hwm = fleet.vmhwm()
        origin = hwm.get("origin")
        reps = {n: v for n, v in hwm.items() if n != "origin"}
        rep = max((v for v in reps.values() if v), default=None)
        log(f"  fleetsync peak RSS: origin {(origin or 0) / 1e6:.0f} MB (after initial index "
            f"{(self.origin_hwm_after_index or 0) / 1e6:.0f} MB), replicas "
            + ", ".join(f"{n} {(v or 0) / 1e6:.0f} MB" for n, v in reps.items()))
        after = list(self.done)
        self.record(sc, "peak RSS, origin side", FLEETSYNC, origin, "bytes", after=after,
                    after_initial_index=self.origin_hwm_after_index, trace=self.hwm_trace)
        self.record(sc, "peak RSS, replica side", FLEETSYNC, rep, "bytes", replicas=reps, after=after,
                    trace=self.hwm_trace)
        if RSYNC in self.peers and RSYNC in self.peer_maxrss:
            note = "max RSS of any rsync process (sender, generator, receiver) over this run's pushes"
            self.record(sc, "peak RSS, origin side", RSYNC, self.peer_maxrss[RSYNC], "bytes", note=note)
            self.record(sc, "peak RSS, replica side", RSYNC, self.peer_maxrss[RSYNC], "bytes", note=note)
        for tool, _ in self.lsyncd_variants():
            if tool in self.peer_maxrss:
                self.record(sc, "peak RSS, origin side", tool, self.peer_maxrss[tool], "bytes",
                            note="VmHWM of the lsyncd daemon (its rsync children not included)")
        self.done.append("memory")

    def egress(self) -> None:
        """Origin egress per round is measured by the round scenario; run it if it has not run."""
        if "round" not in self.done:
            self.round()

    def close(self) -> None:
        """Stop every process the harness started."""
        if self.profiler:
            self.profiler.stop()
        if self.fleet is not None:
            self.fleet.stop()


def sizes_dict(s: Sizes) -> dict[str, Any]:
    """Sizes as a plain dict (for the results file)."""
    return asdict(s)
