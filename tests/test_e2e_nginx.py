"""A real nginx serving a replica while it follows the origin: every response is one complete version.

Invariant 1 (no torn reads) as a web server's clients see it: while files are replaced many times
on the origin, an HTTP reader hammering the replica through nginx gets, for every file that
exists throughout, a 200 with one whole version (never a 404 in the middle of a swap, never a mix
or a truncated body), and at the end the newest version of each.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="needs nginx: apt-get install nginx-light")

FILES = 12
VERSIONS = 12


def _body(i: int, v: int) -> bytes:
    """Version v of page i: a header, a size that changes with v, and a trailer with a checksum."""
    rng = random.Random(i * 1000 + v)
    pad = rng.randbytes(2_000 + rng.randint(0, 60_000)).hex().encode()
    core = f"page {i} version {v}\n".encode() + pad
    return core + b"\nsha256 " + hashlib.sha256(core).hexdigest().encode() + b"\n"


def _version(i: int, body: bytes) -> int:
    """The version a response holds; AssertionError for anything but one complete version of page i."""
    core, sep, trailer = body.rpartition(b"\nsha256 ")
    assert sep and trailer.endswith(b"\n"), f"page {i}: truncated body ({len(body)} bytes)"
    assert hashlib.sha256(core).hexdigest().encode() == trailer.strip(), f"page {i}: body is not one version"
    head = core.split(b"\n", 1)[0].decode()
    assert head.startswith(f"page {i} version "), head
    return int(head.rsplit(" ", 1)[1])


def test_the_checker_rejects_truncated_and_mixed_bodies() -> None:
    a, b = _body(3, 1), _body(3, 2)
    assert _version(3, a) == 1 and _version(3, b) == 2
    for bad in (a[:-10], a[: len(a) // 2], a[: len(a) // 2] + b[len(a) // 2:], b"", _body(4, 1)):
        with pytest.raises(AssertionError):
            _version(3, bad)


def _write(root: Path, i: int, v: int) -> None:
    p = root / "site" / f"page{i}.html"
    tmp = p.with_name(f".page{i}.html.tmp")
    tmp.write_bytes(_body(i, v))
    os.rename(tmp, p)


def _nginx_conf(tmp: Path, port: int, root: Path) -> Path:
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read a 0700 pytest tmp dir
    conf = tmp / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ /\\. {{ deny all; }}
    }}
}}
""")
    return conf


def test_nginx_serves_only_complete_versions_while_the_replica_follows(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "fleet", n_replicas=1, settle=0.05)
    for i in range(FILES):
        (c.origin.root / "site").mkdir(exist_ok=True)
        _write(c.origin.root, i, 0)
    port = free_port()
    assert NGINX is not None
    ng = subprocess.Popen([NGINX, "-c", str(_nginx_conf(tmp_path, port, c.replicas["r1"].root)),
                           "-p", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[int, set[int]] = {i: set() for i in range(FILES)}
    errors: list[str] = []
    reads = 0
    stop = threading.Event()

    def get(i: int) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/site/page{i}.html", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    def reader() -> None:
        nonlocal reads
        rng = random.Random(1)
        while not stop.is_set():
            i = rng.randrange(FILES)
            status, body = get(i)
            reads += 1
            if status != 200:
                errors.append(f"page {i}: HTTP {status} while it exists on the origin throughout")
                continue
            try:
                seen[i].add(_version(i, body))
            except AssertionError as e:
                errors.append(str(e))

    try:
        c.start()
        c.wait_ready()
        c.wait_converged(timeout=60)
        deadline = time.monotonic() + 10
        while get(0)[0] != 200:
            assert ng.poll() is None, f"nginx exited: {ng.stderr.read().decode() if ng.stderr else ''}"
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.1)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        for v in range(1, VERSIONS + 1):
            for i in range(FILES):
                _write(c.origin.root, i, v)
            time.sleep(0.12)
        c.wait_converged(timeout=60)
        time.sleep(0.3)
        stop.set()
        t.join(10)
        assert not errors, f"{len(errors)} bad responses of {reads}, e.g. {errors[:5]}"
        assert reads > 100, f"only {reads} reads: the reader did not overlap the replication"
        assert sum(len(s) for s in seen.values()) > FILES * 2, f"too few versions observed: {seen}"
        for i in range(FILES):
            status, body = get(i)
            assert status == 200 and _version(i, body) == VERSIONS
    finally:
        stop.set()
        c.stop()
        ng.terminate()
        try:
            ng.wait(10)
        except subprocess.TimeoutExpired:
            ng.kill()
