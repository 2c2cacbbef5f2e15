"""Confined filesystem operations under a replica root.

Every operation resolves its path component by component relative to directory file
descriptors with O_NOFOLLOW, so a symlink planted in a parent can never redirect a write or a
delete outside the root (invariant 3). Files are written to a temp name in their directory and
renamed into place, so readers only ever see complete versions (invariant 1).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import shutil
import stat
from collections.abc import Iterator
from typing import Any

from fleetsync import paths
from fleetsync.entry import DIR, FILE, LINK, Entry
from fleetsync.errors import FleetsyncError, IntegrityError, UnsafePath
from fleetsync.hashing import CHUNK, hash_fd, new_hasher

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count()


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd (one call per batch instead of one fsync per file)."""
    if hasattr(_libc, "syncfs"):
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs: {os.strerror(e)}")
    else:  # pragma: no cover - non-Linux
        os.sync()


class ConfinedRoot:
    """A replica root; all paths are relative, validated bytes."""

    def __init__(self, root: str | bytes, *, cache: bool = True) -> None:
        self.root = os.fsencode(root)
        os.makedirs(self.root, exist_ok=True)
        self.fd = os.open(self.root, _DIR_FLAGS)
        self._dirs: dict[bytes, int] = {}
        self._cache = cache
        self._tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

    def close(self) -> None:
        """Release directory descriptors."""
        self.forget_dirs()
        os.close(self.fd)

    def forget_dirs(self) -> None:
        """Drop cached directory descriptors (after a directory was moved or removed)."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- resolution ------------------------------------------------------------------------------
    def dir_fd(self, dpath: bytes, create: bool = False) -> int:
        """Descriptor of directory dpath (b'' = root), walking with O_NOFOLLOW; cached."""
        if not dpath:
            return self.fd
        if not self._cache:
            raise FleetsyncError("directory descriptors are only available with cache=True")
        fd = self._dirs.get(dpath)
        if fd is not None:
            return fd
        parent_fd = self.dir_fd(paths.parent(dpath), create)
        nm = paths.name(dpath)
        try:
            fd = os.open(nm, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(nm, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                pass
            fd = os.open(nm, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                if create:
                    # A non-directory sits where the upstream has a directory: replace it.
                    st = os.stat(nm, dir_fd=parent_fd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(nm, dir_fd=parent_fd)
                        os.mkdir(nm, 0o755, dir_fd=parent_fd)
                        fd = os.open(nm, _DIR_FLAGS, dir_fd=parent_fd)
                    else:
                        raise
                else:
                    raise UnsafePath(f"{dpath!r}: a parent is not a directory (symlink?)") from e
            else:
                raise
        self._dirs[dpath] = fd
        return fd

    def _at(self, path: bytes, create_parents: bool = False) -> tuple[int, bytes]:
        paths.validate(path)
        return self.dir_fd(paths.parent(path), create_parents), paths.name(path)

    def lstat(self, path: bytes) -> os.stat_result | None:
        """lstat of path, or None if it (or a parent) does not exist or a parent is not a directory."""
        try:
            if not self._cache:
                return self._uncached(path, lambda fd, nm: os.stat(nm, dir_fd=fd, follow_symlinks=False))
            dfd, nm = self._at(path)
            return os.stat(nm, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, UnsafePath):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise

    def readlink(self, path: bytes) -> bytes:
        """Target of the symlink at path."""
        if not self._cache:
            return self._uncached(path, lambda fd, nm: os.readlink(nm, dir_fd=fd))
        dfd, nm = self._at(path)
        return os.readlink(nm, dir_fd=dfd)

    def _uncached(self, path: bytes, op: Any) -> Any:
        """Run op(dir_fd, name) on path's parent, resolved afresh without following symlinks."""
        paths.validate(path)
        parts = path.split(b"/")
        fd = self.fd
        try:
            for part in parts[:-1]:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self.fd:
                    os.close(fd)
                fd = nfd
            return op(fd, parts[-1])
        finally:
            if fd != self.fd:
                os.close(fd)

    # -- reads -----------------------------------------------------------------------------------
    def open_read(self, path: bytes) -> int:
        """Open a regular file for reading without following symlinks (thread-safe when cache=False)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if self._cache:
            dfd, nm = self._at(path)
            return os.open(nm, flags, dir_fd=dfd)
        return self._uncached(path, lambda fd, nm: os.open(nm, flags, dir_fd=fd))

    def matches(self, path: bytes, e: Entry) -> bool:
        """True if path holds exactly e's content (size+mtime pre-check, then a local hash)."""
        st = self.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != e.size or st.st_mtime_ns != e.mtime_ns:
            return False
        try:
            fd = self.open_read(path)
        except OSError:
            return False
        try:
            digest, _ = hash_fd(fd)
        finally:
            os.close(fd)
        return digest == e.hash

    # -- writes ----------------------------------------------------------------------------------
    def _temp_name(self) -> bytes:
        return paths.TEMP_PREFIX + f"{os.getpid()}.{next(_counter)}".encode() + paths.TEMP_SUFFIX

    def open_temp(self, path: bytes) -> tuple[int, bytes | None, int]:
        """An unnamed (O_TMPFILE) or named temp file in path's directory: (dir fd, temp name or None, fd).

        An O_TMPFILE file is invisible until linked and vanishes by itself after a crash; where the
        filesystem lacks O_TMPFILE a named `.fleetsync.*.tmp` file is used instead.
        """
        dfd, _ = self._at(path, create_parents=True)
        if self._tmpfile:
            try:
                return dfd, None, os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                self._tmpfile = False
        tmp = self._temp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        return dfd, tmp, fd

    def commit_temp(self, path: bytes, dfd: int, tmp: bytes | None, fd: int, e: Entry) -> None:
        """Set mode and mtime on a written temp file, then put it at path atomically."""
        try:
            os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            if tmp is None:
                # A new name: link the unnamed file straight into place (one directory operation).
                try:
                    os.link(f"/proc/self/fd/{fd}", paths.name(path), dst_dir_fd=dfd, follow_symlinks=True)
                    return
                except FileExistsError:
                    pass
                tmp = self._temp_name()
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dfd, follow_symlinks=True)
        finally:
            os.close(fd)
        self._replace(dfd, tmp, path)

    def abort_temp(self, dfd: int, tmp: bytes | None, fd: int | None = None) -> None:
        """Remove an unfinished temp file."""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is None:
            return
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass

    def _replace(self, dfd: int, tmp: bytes, path: bytes) -> None:
        nm = paths.name(path)
        try:
            os.rename(tmp, nm, src_dir_fd=dfd, dst_dir_fd=dfd)
        except (IsADirectoryError, OSError) as err:
            if err.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            self.delete(path)
            os.rename(tmp, nm, src_dir_fd=dfd, dst_dir_fd=dfd)

    def write_file(self, path: bytes, data: bytes, e: Entry) -> None:
        """Atomically place verified content at path."""
        dfd, tmp, fd = self.open_temp(path)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BaseException:
            self.abort_temp(dfd, tmp, fd)
            raise
        self.commit_temp(path, dfd, tmp, fd, e)

    def copy_file(self, src: bytes, path: bytes, e: Entry) -> bool:
        """Copy local content from src to path if src really has e's hash; False otherwise."""
        try:
            sfd = self.open_read(src)
        except (OSError, UnsafePath):
            return False
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                return False
            dfd, tmp, fd = self.open_temp(path)
            h = new_hasher()
            try:
                while chunk := os.read(sfd, CHUNK):
                    h.update(chunk)
                    os.write(fd, chunk)
            except BaseException:
                self.abort_temp(dfd, tmp, fd)
                raise
            if h.digest() != e.hash:
                self.abort_temp(dfd, tmp, fd)
                return False
            self.commit_temp(path, dfd, tmp, fd, e)
            return True
        finally:
            os.close(sfd)

    def set_attrs(self, path: bytes, e: Entry) -> None:
        """Apply mode (and mtime for files) to an existing path without following symlinks."""
        dfd, nm = self._at(path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if e.kind == DIR else 0)
        fd = os.open(nm, flags, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != e.mode:
                os.fchmod(fd, e.mode)
            if e.kind == FILE and st.st_mtime_ns != e.mtime_ns:
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def put_dir(self, path: bytes, e: Entry) -> None:
        """Ensure path is a directory with e's mode (replacing a non-directory)."""
        dfd, nm = self._at(path, create_parents=True)
        st = self.lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(nm, dir_fd=dfd)
            st = None
        if st is None:
            os.mkdir(nm, 0o700, dir_fd=dfd)
        self.set_attrs(path, e)

    def put_link(self, path: bytes, e: Entry) -> None:
        """Atomically make path a symlink to e.target."""
        assert e.target is not None
        st = self.lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            dfd, nm = self._at(path)
            if os.readlink(nm, dir_fd=dfd) == e.target:
                return
        dfd, _ = self._at(path, create_parents=True)
        tmp = self._temp_name()
        os.symlink(e.target, tmp, dir_fd=dfd)
        self._replace(dfd, tmp, path)

    def delete(self, path: bytes) -> None:
        """Remove path (recursively for directories); absent is fine."""
        try:
            dfd, nm = self._at(path)
            st = os.stat(nm, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, UnsafePath):
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget_dirs()
            dfd, nm = self._at(path)
            shutil.rmtree(nm, dir_fd=dfd)
        else:
            os.unlink(nm, dir_fd=dfd)

    def rename(self, old: bytes, new: bytes) -> None:
        """Rename old to new within the root, replacing new."""
        sfd, snm = self._at(old)
        dfd, dnm = self._at(new, create_parents=True)
        is_dir = stat.S_ISDIR(os.stat(snm, dir_fd=sfd, follow_symlinks=False).st_mode)
        try:
            os.rename(snm, dnm, src_dir_fd=sfd, dst_dir_fd=dfd)
        except OSError as err:
            if err.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            self.delete(new)
            sfd, snm = self._at(old)
            dfd, dnm = self._at(new, create_parents=True)
            os.rename(snm, dnm, src_dir_fd=sfd, dst_dir_fd=dfd)
        if is_dir:
            self.forget_dirs()

    def kind(self, path: bytes) -> str | None:
        """Kind letter of what is at path, or None."""
        st = self.lstat(path)
        if st is None:
            return None
        if stat.S_ISREG(st.st_mode):
            return FILE
        if stat.S_ISDIR(st.st_mode):
            return DIR
        if stat.S_ISLNK(st.st_mode):
            return LINK
        return "?"

    def sweep_temps(self, dpath: bytes) -> int:
        """Remove leftover fleetsync temp files in one directory (after a crash)."""
        try:
            dfd = self.dir_fd(dpath)
        except (OSError, UnsafePath):
            return 0
        n = 0
        for nm in map(os.fsencode, os.listdir(dfd)):
            if nm.startswith(paths.TEMP_PREFIX) and nm.endswith(paths.TEMP_SUFFIX):
                try:
                    os.unlink(nm, dir_fd=dfd)
                    n += 1
                except OSError:
                    pass
        return n

    def walk(self) -> Iterator[tuple[bytes, os.stat_result]]:
        """Every path under the root with its lstat (bootstrap only)."""
        for dirpath, dirnames, filenames, dfd in os.fwalk(b".", dir_fd=self.fd, follow_symlinks=False):
            rel = b"" if dirpath == b"." else dirpath[2:]
            for nm in dirnames + filenames:
                try:
                    st = os.stat(nm, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield paths.join(rel, nm), st

    def sync(self) -> None:
        """Make everything written so far durable."""
        syncfs(self.fd)


def verify_digest(data: bytes, e: Entry, where: str) -> None:
    """Raise IntegrityError if data does not hash to e.hash."""
    from fleetsync.hashing import hash_bytes

    if len(data) != e.size or hash_bytes(data) != e.hash:
        raise IntegrityError(f"{where}: hash mismatch for blob {e.hash.hex()[:12]}…" if e.hash else where)


__all__ = ["ConfinedRoot", "syncfs", "verify_digest", "FleetsyncError"]
