"""Placing an unnamed temp file: linkat(AT_EMPTY_PATH) where allowed, /proc/self/fd otherwise."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from fleetsync.replica import fsops

pytestmark = pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="needs O_TMPFILE (Linux)")


def _tmpfile(d: Path, data: bytes) -> int:
    fd = os.open(d, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("fast", [True, False])
def test_link_fd_names_the_file_and_refuses_an_existing_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fast: bool) -> None:
    monkeypatch.setattr(fsops, "_empty_path_links", fast and fsops._empty_path_links)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fd = _tmpfile(tmp_path, b"one")
    try:
        fsops.link_fd(fd, b"a.html", dfd)
        assert (tmp_path / "a.html").read_bytes() == b"one"
        fd2 = _tmpfile(tmp_path, b"two")
        try:
            with pytest.raises(FileExistsError):
                fsops.link_fd(fd2, "a.html", dfd)
        finally:
            os.close(fd2)
        assert (tmp_path / "a.html").read_bytes() == b"one"
        assert sorted(os.listdir(tmp_path)) == ["a.html"]
    finally:
        os.close(fd)
        os.close(dfd)


class _RefusingLibc:
    """linkat as for a process without CAP_DAC_READ_SEARCH: AT_EMPTY_PATH gives ENOENT."""

    def __init__(self) -> None:
        self.calls = 0

    def linkat(self, *args: object) -> int:
        self.calls += 1
        ctypes.set_errno(errno.ENOENT)
        return -1


def test_link_fd_falls_back_to_proc_once_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _RefusingLibc()
    monkeypatch.setattr(fsops, "_libc", libc)
    monkeypatch.setattr(fsops, "_empty_path_links", True)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in (b"a", b"b"):
            fd = _tmpfile(tmp_path, name)
            try:
                fsops.link_fd(fd, name, dfd)
            finally:
                os.close(fd)
            assert (tmp_path / name.decode()).read_bytes() == name
        assert libc.calls == 1 and fsops._empty_path_links is False  # asked once, then /proc only
    finally:
        os.close(dfd)


def test_link_fd_keeps_the_fast_way_when_the_directory_is_gone(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOENT because the directory was removed is not a refusal: /proc fails too, nothing is switched off."""
    if not fsops._empty_path_links:
        pytest.skip("linkat(AT_EMPTY_PATH) is not permitted here (needs CAP_DAC_READ_SEARCH, e.g. root)")
    monkeypatch.setattr(fsops, "_empty_path_links", True)
    d = tmp_path / "d"
    d.mkdir()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    fd = _tmpfile(tmp_path, b"x")
    try:
        os.rmdir(d)
        with pytest.raises(FileNotFoundError):
            fsops.link_fd(fd, b"a", dfd)
        assert fsops._empty_path_links is True
    finally:
        os.close(fd)
        os.close(dfd)
