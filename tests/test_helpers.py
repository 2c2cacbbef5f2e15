"""Sanity checks of the test helpers themselves (no fleetsync processes involved)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from tests.helpers import selfcheck, tree
from tests.helpers.workload import Executor, Op, workloads


def test_selfcheck_roundtrip_and_truncation() -> None:
    """A made blob checks; any strict prefix or altered byte does not."""
    data = selfcheck.make(b"x" * 1000)
    assert selfcheck.check(data)
    assert selfcheck.check(selfcheck.make(b""))
    assert not any(selfcheck.check(data[:n]) for n in (0, 10, len(data) - 1))
    assert not selfcheck.check(data[:-1] + b"y")


def test_torn_reader_detects_in_place_writes(tmp_path: Path) -> None:
    """The TornReader must flag reads of a file being rewritten in place (the failure it exists to catch)."""
    rel = b"f.html"
    target = os.path.join(os.fsencode(tmp_path), rel)
    selfcheck.write_nonatomic(target, selfcheck.make(b"a" * 5000))
    reader = selfcheck.TornReader(tmp_path, [rel], pause=0)
    reader.start()
    writer = selfcheck.Rewriter(tmp_path, [rel], gap=0.0)
    writer.start()
    time.sleep(1.0)
    writer.stop()
    bad, good = reader.stop()
    assert bad, f"no torn read detected in {good} reads of a file rewritten in place"


def test_snapshot_and_diff(tmp_path: Path) -> None:
    """Snapshots record kinds/modes/targets, skip ignored names, and diff reports each difference."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "d").mkdir()
    (a / "d" / "f").write_bytes(b"hello")
    os.symlink("d/f", a / "l")
    (a / "x.part").write_bytes(b"partial")
    (a / ".y.tmp").write_bytes(b"tmp")
    os.mkdir(os.path.join(os.fsencode(a), b"\xff\nodd"))
    shutil.copytree(a, b, symlinks=True, copy_function=shutil.copy2)
    sa, sb = tree.snapshot(a), tree.snapshot(b)
    assert b"x.part" not in sa and b".y.tmp" not in sa
    assert set(sa) == {b"d", b"d/f", b"l", b"\xff\nodd"}
    assert sa == sb, tree.diff(sa, sb)
    os.chmod(b / "d" / "f", 0o600)
    os.unlink(b / "l")
    os.symlink("elsewhere", b / "l")
    (b / "extra").write_bytes(b"")
    lines = tree.diff(sa, tree.snapshot(b))
    assert len(lines) == 3, lines


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=workloads(max_size=60))
def test_executor_runs_any_workload(tmp_path: Path, ops: list[Op]) -> None:
    """The workload executor applies any generated op list without crashing and keeps its base dir."""
    root = tmp_path / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    Executor(root, b"w").run([op for op in ops if op.kind != "sleep"])
    assert (root / "w").is_dir()
    tree.snapshot(root)
