"""--detector auto: fanotify when it can work (root, Linux >= 5.9, file handles), else inotify, saying why."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetsync import origin as origin_mod
from fleetsync.detect.fanotify import fanotify_available, fanotify_precheck
from fleetsync.detect.inotify import InotifyDetector
from fleetsync.origin import Origin, select_detector

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify/fanotify are Linux-only")


# -- the selection rule, from its inputs ---------------------------------------------------------
@pytest.mark.parametrize(("platform", "euid", "kernel", "reason"), [
    ("linux", 0, (6, 1), None),
    ("linux", 0, (5, 9), None),
    ("linux", 1000, (6, 1), "not root (euid 1000)"),
    ("linux", 0, (5, 8), "kernel 5.8 < 5.9"),
    ("linux", 0, (4, 19), "kernel 4.19 < 5.9"),
    ("freebsd14", 0, (14, 0), "not Linux (freebsd14)"),
])
def test_precheck(platform: str, euid: int, kernel: tuple[int, int], reason: str | None) -> None:
    why = fanotify_precheck(platform, euid, kernel)
    if reason is None:
        assert why is None
    else:
        assert why is not None and why.startswith(reason), why


def test_select_detector() -> None:
    def ok() -> tuple[bool, str]:
        return True, "fanotify on Linux 6.1"

    def no_handles() -> tuple[bool, str]:
        return False, "filesystem does not support file handles: EOPNOTSUPP"

    def must_not_run() -> tuple[bool, str]:
        raise AssertionError("fanotify probed for an explicit non-fanotify detector")

    assert select_detector("auto", ok) == ("fanotify", None)
    assert select_detector("auto", no_handles) == ("inotify", "filesystem does not support file handles: EOPNOTSUPP")
    assert select_detector("fanotify", ok) == ("fanotify", None)
    assert select_detector("fanotify", no_handles) == (None, "filesystem does not support file handles: EOPNOTSUPP")
    assert select_detector("inotify", must_not_run) == ("inotify", None)
    assert select_detector("scan", must_not_run) == ("scan", None)


# -- the origin follows it, with one log line ----------------------------------------------------
def _origin(tmp_path: Path, detector: str) -> Origin:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    return Origin(str(root), str(tmp_path / "state"), detector=detector)


def _close(o: Origin) -> None:
    o.detector.close()
    o.journal.close()


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "fanotify" in r.getMessage() and "using inotify" in r.getMessage()]


@linux_only
def test_auto_uses_inotify_when_not_root_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    why = fanotify_precheck("linux", 1000, (6, 1))
    assert why is not None
    monkeypatch.setattr(origin_mod, "_fanotify_check", lambda root: (False, why))
    caplog.set_level(logging.INFO, logger="fleetsync.origin")
    o = _origin(tmp_path, "auto")
    try:
        assert isinstance(o.detector, InotifyDetector)
        assert _fallback_lines(caplog) == [f"fanotify unavailable: {why}; using inotify"]
    finally:
        _close(o)


@linux_only
def test_auto_falls_back_when_fanotify_init_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe passed but the detector's own fanotify_init fails (e.g. EMFILE): inotify, not an exit."""
    import fleetsync.detect.fanotify as fan

    def failing_init(flags: int) -> int:
        raise OSError(24, "fanotify_init: Too many open files")
    monkeypatch.setattr(origin_mod, "_fanotify_check", lambda root: (True, "fanotify on Linux 6.1"))
    monkeypatch.setattr(fan, "fanotify_init", failing_init)
    caplog.set_level(logging.INFO, logger="fleetsync.origin")
    o = _origin(tmp_path, "auto")
    try:
        assert isinstance(o.detector, InotifyDetector)
        lines = _fallback_lines(caplog)
        assert len(lines) == 1 and "Too many open files" in lines[0], lines
    finally:
        _close(o)
    with pytest.raises(SystemExit, match="fanotify unavailable"):
        _origin(tmp_path, "fanotify")


# -- end to end: a real origin process as root ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
@linux_only
def test_origin_auto_logs_its_detector(tmp_path: Path) -> None:
    """`fleetsync origin` (default --detector auto) logs which backend it uses: fanotify where it can work."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "index.html").write_text("hi")
    ok, why = fanotify_available(root)
    want = "fanotify" if ok else "inotify"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleetsync", "origin", "--root", str(root), "--state",
                             str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "change detection:" in line:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    detection = [x for x in lines if "change detection:" in x]
    assert detection and detection[0].endswith(f"change detection: {want}"), lines
    if not ok:
        assert any(f"fanotify unavailable: {why}; using inotify" in x for x in lines), lines
