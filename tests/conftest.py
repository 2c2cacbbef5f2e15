"""Shared fixtures: a cluster factory that always stops its processes and reports their logs on failure, and a real API server (`origin`)."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any, Iterator

import pytest

from tests.helpers import cluster as cluster_mod
from tests.helpers.apiserver import ApiServer
from tests.helpers.cluster import Cluster, ClusterFactory


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the tail of every running fleetsync process log to a failing test's report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and cluster_mod.ACTIVE:
        for c in list(cluster_mod.ACTIVE):
            rep.sections.append((f"fleetsync logs ({c.base})", c.logs_report(lines=80)))


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory fixture: ``make_cluster(n_replicas=2, **kw)`` returns a started, ready cluster; all stopped at teardown."""
    made: list[Cluster] = []

    def factory(n_replicas: int = 2, name: str | None = None, **kwargs: Any) -> Cluster:
        base = tmp_path / (name or f"cluster{len(made)}")
        base.mkdir()
        c = Cluster(base, n_replicas=n_replicas, **kwargs)
        made.append(c)
        c.start()
        c.wait_ready()
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.stop()


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[ApiServer]:
    """A real API server over tmp_path/origin with an origin's journal (no hash index), stopped at teardown."""
    srv = ApiServer(tmp_path, content_index=False)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def pytest_report_header(config: pytest.Config) -> str:
    """Say where the fleetsync logs of a run end up."""
    return f"fleetsync e2e: process logs are kept under pytest's tmp dir (basetemp); euid={os.geteuid()}"
