"""The embedded default job behind `make demo`: an origin and two replicas on localhost."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from rich.console import Console

from fleetsync.ops.corpus import generate, mutate
from fleetsync.ops.verify import diff_trees, fingerprint_tree

con = Console(stderr=False)


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> dict[str, Any] | None:
    """GET /v1/status, or None if unreachable."""
    try:
        with urllib.request.urlopen(url + "/v1/status", timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def wait_converged(url: str, ids: list[str], timeout: float = 120.0, label: str = "") -> float:
    """Wait until the origin is idle and every replica applied its head; print progress; returns seconds."""
    t0 = time.monotonic()
    last_line = ""
    stable = 0
    while time.monotonic() - t0 < timeout:
        st = get_status(url)
        if st:
            reps = {r["id"]: r for r in st["replicas"]}
            line = f"  {label} origin seq {st['seq']} pending {st['pending']} | " + " | ".join(
                f"{i} at {reps[i]['applied_seq']} lag {reps[i]['lag_records']}" if i in reps else f"{i}: -"
                for i in ids)
            if line != last_line:
                con.print(line)
                last_line = line
            done = st["pending"] == 0 and all(i in reps and reps[i]["applied_seq"] == st["seq"] for i in ids)
            stable = stable + 1 if done else 0
            if stable >= 2:
                return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"replicas did not converge within {timeout:.0f}s")


def run_demo(workdir: str | None, n_files: int, keep: bool) -> int:
    """Run the demo; returns the process exit code."""
    tmp = workdir or tempfile.mkdtemp(prefix="fleetsync-demo-")
    os.makedirs(tmp, exist_ok=True)
    origin_root = os.path.join(tmp, "origin")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if os.path.exists(origin_root):
            shutil.rmtree(tmp)
            os.makedirs(tmp)
        con.rule("[bold]fleetsync demo")
        t = time.monotonic()
        corpus = generate(origin_root, n_files, seed=7)
        con.print(f"generated {len(corpus.files)} files in {len(corpus.dirs)} directories "
                  f"under {origin_root} ({time.monotonic() - t:.1f}s)")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        exe = [sys.executable, "-m", "fleetsync"]

        def spawn(args: list[str], log: str) -> subprocess.Popen[bytes]:
            f = open(os.path.join(tmp, log), "wb")
            p = subprocess.Popen(exe + args, stdout=f, stderr=subprocess.STDOUT)
            procs.append(p)
            return p

        spawn(["origin", "--root", origin_root, "--state", os.path.join(tmp, "origin-state"),
               "--listen", f"127.0.0.1:{port}"], "origin.log")
        while get_status(url) is None:
            time.sleep(0.1)
        ids = ["web-1", "web-2"]
        for i in ids:
            spawn(["replica", "--root", os.path.join(tmp, i), "--state", os.path.join(tmp, i + "-state"),
                   "--upstream", url, "--id", i], i + ".log")
        con.print(f"origin on {url}; replicas {', '.join(ids)} bootstrapping")
        secs = wait_converged(url, ids, label="bootstrap:")
        con.print(f"[green]bootstrap converged in {secs:.1f}s")

        rng = random.Random(11)
        rounds = [("change round: 300 files (new, edits, deletes, renames)", lambda: mutate(corpus, 300, seed=3))]

        def dir_move() -> dict[str, int]:
            src = rng.choice(corpus.dirs)
            dst = src + b"-moved"
            os.rename(os.path.join(os.fsencode(origin_root), src), os.path.join(os.fsencode(origin_root), dst))
            corpus.files = [dst + f[len(src):] if f.startswith(src + b"/") else f for f in corpus.files]
            corpus.dirs = [dst + d[len(src):] if d == src or d.startswith(src + b"/") else d for d in corpus.dirs]
            return {"moved directory": 1}

        def small_edits() -> dict[str, int]:
            for _ in range(20):
                p = rng.choice(corpus.files)
                with open(os.path.join(os.fsencode(origin_root), p), "ab") as f:
                    f.write(b"/* edit */\n")
            return {"appended": 20}

        rounds += [("a whole directory moved", dir_move), ("20 in-place appends", small_edits),
                   ("second change round: 200 files", lambda: mutate(corpus, 200, seed=4))]
        for label, fn in rounds:
            counts = fn()
            con.print(f"[bold]{label}[/]: {counts}")
            secs = wait_converged(url, ids, label="follow:")
            con.print(f"[green]converged {secs:.2f}s after the last write")

        con.print("verifying trees (paths, kinds, bytes, modes, mtimes, symlink targets)…")
        want = fingerprint_tree(origin_root)
        ok = True
        for i in ids:
            got = fingerprint_tree(os.path.join(tmp, i))
            d = diff_trees(want, got)
            if d:
                ok = False
                con.print(f"[red]{i} differs from origin:[/]\n  " + "\n  ".join(d))
            else:
                con.print(f"[green]{i}: identical[/] ({len(got)} entries)")
        st = get_status(url) or {}
        con.rule("summary")
        con.print(f"origin seq {st.get('seq')}, {len(want)} entries; "
                  + "; ".join(f"{r['id']} applied {r['applied_seq']}, lag {r['lag_records']}, "
                              f"{r['bytes_sent']} bytes fetched" for r in st.get("replicas", [])))
        con.print("[bold green]CONVERGED: all replicas identical to the origin" if ok else "[bold red]MISMATCH")
        if keep and ok:
            con.print(f"still running (logs in {tmp}); try: fleetsync status --upstream {url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    except TimeoutError as e:
        con.print(f"[red]{e}[/]; logs in {tmp}")
        for p in procs:
            p.terminate()
        return 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if workdir is None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
