"""Confined filesystem operations under a replica root.

Every operation resolves its path component by component relative to directory file
descriptors with O_NOFOLLOW, so a symlink planted in a parent can never redirect a write or a
delete outside the root (invariant 3). Files are written to a temp name in their directory and
renamed into place, so readers only ever see complete versions (invariant 1).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import itertools
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fleetsync import paths
from fleetsync.entry import DIR, FILE, LINK, Entry
from fleetsync.errors import FleetsyncError, IntegrityError, UnsafePath
from fleetsync.hashing import CHUNK, hash_bytes, hash_fd, new_hasher

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
if hasattr(_libc, "renameat2"):
    _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
if hasattr(_libc, "linkat"):
    _libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_AT_EMPTY_PATH = 0x1000
#: linkat(AT_EMPTY_PATH) works here (it needs CAP_DAC_READ_SEARCH); set False after the first refusal.
_empty_path_links = hasattr(_libc, "linkat")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2
#: Replaced versions waiting to be unlinked before the next flush (bounds open descriptors).
TRASH_MAX = 1024
#: Committed old versions wait for an idle moment to be unlinked, at most this many of them.
DEFER_MAX = 512
_counter = itertools.count()
_hints_lock = threading.Lock()


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd (one call per batch instead of one fsync per file)."""
    if hasattr(_libc, "syncfs"):
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs: {os.strerror(e)}")
    else:  # pragma: no cover - non-Linux
        os.sync()


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd (one call for a small file)."""
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view):]


def link_fd(fd: int, name: bytes | str, dst_dir_fd: int) -> None:
    """Give the open file fd (an O_TMPFILE file) the name `name` in directory dst_dir_fd.

    linkat(fd, "", ..., AT_EMPTY_PATH) where the process may (root), else through /proc/self/fd/N,
    which costs a path walk through procfs (measured: about 3 µs more per file, 10 % of creating
    a small file here). Raises FileExistsError if the name exists.
    """
    global _empty_path_links
    refused = False
    if _empty_path_links:
        bname = os.fsencode(name)
        if _libc.linkat(fd, b"", dst_dir_fd, bname, _AT_EMPTY_PATH) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), bname)
        # Not permitted (ENOENT without CAP_DAC_READ_SEARCH), or the directory went away: the
        # /proc way decides; if it works, the fast way is not tried again.
        refused = True
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dst_dir_fd, follow_symlinks=True)
    if refused:
        _empty_path_links = False


class ConfinedRoot:
    """A replica root; all paths are relative, validated bytes."""

    def __init__(self, root: str | bytes, *, cache: bool = True) -> None:
        self.root = os.fsencode(root)
        os.makedirs(self.root, exist_ok=True)
        self.fd = os.open(self.root, _DIR_FLAGS)
        self._dirs: dict[bytes, int] = {}
        self._cache = cache
        self._tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
        self._exchange = hasattr(_libc, "renameat2")
        #: (descriptor of its directory, its directory's path, temp name) of each replaced version
        #: not yet unlinked.
        self._trash: list[tuple[int, bytes, bytes]] = []
        #: Replaced or deleted versions of committed batches waiting for start_cleanup().
        self._deferred: list[tuple[int, bytes, bytes]] = []
        #: Old versions being unlinked in the background (see start_cleanup), and their directories.
        self._cleaning: Future[OSError | None] | None = None
        self._cleaning_dirs: set[bytes] = set()
        #: The first error of a finished background cleanup not yet reported (see defer_trash).
        self.cleanup_error: OSError | None = None
        self._cleaner: ThreadPoolExecutor | None = None
        self._hints: CachedReader | None = None

    def close(self) -> None:
        """Remove replaced versions still waiting, release directory descriptors."""
        try:
            self.flush_trash(strict=False)
        finally:
            if self._cleaner is not None:
                self._cleaner.shutdown(wait=True)
            self.forget_dirs()
        if self._hints is not None:
            self._hints.close()
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
                    link_fd(fd, paths.name(path), dfd)
                    return
                except FileExistsError:
                    pass
                tmp = self._temp_name()
                link_fd(fd, tmp, dfd)
        finally:
            os.close(fd)
        self._replace(dfd, tmp, path)

    def make_root_temp(self, data: bytes, e: Entry, near: bytes | None = None) -> tuple[int, bytes | None]:
        """Verify data against e, write it to an unlinked temp file with e's mode and mtime.

        Thread-safe: never uses the directory cache. The unnamed file is created in the
        directory `near` (the destination's parent, for inode locality) when a separate, locked
        resolver finds it, else in the root; where it was created does not matter for
        correctness, link_root_temp() places it by path. Returns (fd, temp name or None).
        """
        if len(data) != e.size or hash_bytes(data) != e.hash:
            raise IntegrityError(f"blob {e.hash.hex()[:12] if e.hash else '?'}…: hash mismatch, not written")
        fd, tmp = -1, None
        if near and self._tmpfile:
            fd = self._near_tmpfile(near)
        if fd < 0:
            fd, tmp = self.open_root_temp()
        try:
            write_all(fd, data)
            # (Not the mode at creation: a directory's default ACL would override it.)
            os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        except BaseException:
            self.abort_temp(self.fd, tmp, fd)
            raise
        return fd, tmp

    def _near_tmpfile(self, dpath: bytes) -> int:
        """An O_TMPFILE file in directory dpath, or -1 (not resolvable now, or unsupported)."""
        if self._hints is None:
            with _hints_lock:
                if self._hints is None:
                    self._hints = CachedReader(self.root, max_dirs=256)
        for fresh in (False, True):
            try:
                return self._hints.open_tmpfile(dpath, fresh)
            except (OSError, UnsafePath):
                continue
        return -1

    def open_root_temp(self) -> tuple[int, bytes | None]:
        """A writable temp file in the root directory (unnamed if possible): (fd, temp name or None). Thread-safe."""
        if self._tmpfile:
            try:
                return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=self.fd), None
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                self._tmpfile = False
        tmp = self._temp_name()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        return fd, tmp

    def link_root_temp(self, path: bytes, fd: int, tmp: bytes | None) -> None:
        """Put a temp file from make_root_temp() at path atomically (link or rename); closes fd."""
        try:
            dfd, nm = self._at(path, create_parents=True)
            if tmp is None:
                try:
                    link_fd(fd, nm, dfd)
                    return
                except FileExistsError:
                    pass
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                    self._copy_fd_into(fd, path)
                    return
                tmp = self._temp_name()
                link_fd(fd, tmp, dfd)
                self._replace(dfd, tmp, path)
                return
            try:
                self._replace(dfd, tmp, path, src_dfd=self.fd)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                self._copy_fd_into(fd, path)
                os.unlink(tmp, dir_fd=self.fd)
        finally:
            os.close(fd)

    def _copy_fd_into(self, sfd: int, path: bytes) -> None:
        """Copy a root temp file into a temp next to path, then place it (path is on another mount)."""
        st = os.fstat(sfd)
        rfd = os.open(f"/proc/self/fd/{sfd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            dfd, tmp, fd = self.open_temp(path)
            try:
                while chunk := os.read(rfd, CHUNK):
                    os.write(fd, chunk)
            except BaseException:
                self.abort_temp(dfd, tmp, fd)
                raise
        finally:
            os.close(rfd)
        self.commit_temp(path, dfd, tmp, fd, Entry(FILE, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns))

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

    def _replace(self, dfd: int, tmp: bytes, path: bytes, src_dfd: int | None = None) -> None:
        """Atomically put temp `tmp` (in src_dfd, default dfd) at path, replacing what is there."""
        nm = paths.name(path)
        sfd = dfd if src_dfd is None else src_dfd
        if self._exchange and self._swap(sfd, b"" if src_dfd is not None else paths.parent(path), tmp, dfd, nm):
            return
        try:
            os.rename(tmp, nm, src_dir_fd=sfd, dst_dir_fd=dfd)
        except (IsADirectoryError, OSError) as err:
            if err.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            self.delete(path)  # may drop cached directory descriptors: resolve again
            dfd, _ = self._at(path, create_parents=True)
            os.rename(tmp, nm, src_dir_fd=dfd if src_dfd is None else src_dfd, dst_dir_fd=dfd)

    def _swap(self, sfd: int, sdir: bytes, tmp: bytes, dfd: int, nm: bytes) -> bool:
        """Exchange temp `tmp` (in sfd = directory sdir) and an existing non-directory at nm.

        Replacing by rename() makes ext4 (auto_da_alloc) start writeback of the new file inside the
        call, about 1 ms per file on a busy disk, and frees the old file's blocks there too;
        RENAME_EXCHANGE does neither. The old version stays under the temp name until it is
        unlinked by flush_trash() or drop_trash(). False: nothing done, rename instead.
        """
        try:
            st = os.stat(nm, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode):
            return False
        if _libc.renameat2(sfd, tmp, dfd, nm, _RENAME_EXCHANGE) != 0:
            if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                self._exchange = False  # filesystem or kernel without RENAME_EXCHANGE
            return False
        self._to_trash(sfd, sdir, tmp)
        return True

    def _to_trash(self, dfd: int, dpath: bytes, tmp: bytes) -> None:
        self._trash.append((os.dup(dfd), dpath, tmp))
        if len(self._trash) >= TRASH_MAX:
            self.flush_trash()

    def take_trash(self) -> list[tuple[int, bytes, bytes]]:
        """Hand over the replaced versions waiting under temp names (unlink them with drop_trash)."""
        trash, self._trash = self._trash, []
        return trash

    @staticmethod
    def drop_trash(trash: list[tuple[int, bytes, bytes]]) -> OSError | None:
        """Unlink replaced versions from take_trash(); thread-safe. Returns the first error, if any."""
        err: OSError | None = None
        for fd, _, tmp in trash:
            try:
                os.unlink(tmp, dir_fd=fd)
            except FileNotFoundError:
                pass  # its directory was removed meanwhile
            except OSError as e:
                err = err or e
            finally:
                os.close(fd)
        return err

    def flush_trash(self, strict: bool = True) -> None:
        """Unlink every old version now (deferred ones too), after a background cleanup (errors raised if strict)."""
        err = self.wait_cleanup()
        deferred, self._deferred = self._deferred, []
        err = self.drop_trash(deferred + self.take_trash()) or err
        if err is not None and strict:
            raise FleetsyncError(f"removing a replaced version under {self.root!r}: {err}") from err

    def defer_trash(self) -> set[bytes]:
        """Hand the batch's old versions to the deferred cleanup (call before the cursor commit).

        Returns every directory that may still hold an old version under a temp name (deferred,
        or being unlinked now): a restart after a crash sweeps them. A finished background
        cleanup's error is kept in `cleanup_error`.
        """
        if self._cleaning is not None and self._cleaning.done():
            self.cleanup_error = self.wait_cleanup() or self.cleanup_error
        self._deferred.extend(self.take_trash())
        return {d for _, d, _ in self._deferred} | self._cleaning_dirs

    @property
    def cleanup_due(self) -> bool:
        """True when enough old versions wait that they should go now, idle or not."""
        return len(self._deferred) >= DEFER_MAX

    @property
    def deferred(self) -> int:
        """How many committed old versions wait for start_cleanup()."""
        return len(self._deferred)

    def start_cleanup(self) -> bool:
        """Unlink the deferred old versions on a background thread; False if nothing was started
        (none wait, or the previous cleanup still runs).

        Only unique temp names are unlinked, through descriptors of their directories, so this
        overlaps with later writes; removing or renaming a directory waits for it first.
        """
        if not self._deferred or (self._cleaning is not None and not self._cleaning.done()):
            return False
        if self._cleaning is not None:
            self.cleanup_error = self.wait_cleanup() or self.cleanup_error
        trash, self._deferred = self._deferred, []
        if self._cleaner is None:
            self._cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetsync-cleanup")
        self._cleaning_dirs = {d for _, d, _ in trash}
        self._cleaning = self._cleaner.submit(self.drop_trash, trash)
        return True

    def wait_cleanup(self) -> OSError | None:
        """Wait for the background cleanup, if any; returns its first error."""
        fut, self._cleaning = self._cleaning, None
        self._cleaning_dirs = set()
        return fut.result() if fut is not None else None

    def write_file(self, path: bytes, data: bytes, e: Entry) -> None:
        """Atomically place verified content at path."""
        dfd, tmp, fd = self.open_temp(path)
        try:
            write_all(fd, data)
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

    def delete(self, path: bytes, *, defer: bool = False) -> None:
        """Remove path (recursively for directories); absent is fine.

        With `defer`, a file is renamed to a temp name in its directory and unlinked with the
        replaced versions (flush_trash, or the deferred cleanup after the batch's commit).
        """
        try:
            dfd, nm = self._at(path)
            st = os.stat(nm, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, UnsafePath):
            return
        if stat.S_ISDIR(st.st_mode):
            self.cleanup_error = self.wait_cleanup() or self.cleanup_error  # rmtree must not race its unlinks
            self.forget_dirs()
            dfd, nm = self._at(path)
            shutil.rmtree(nm, dir_fd=dfd)
        elif defer:
            # Renamed aside now (a directory entry change), unlinked with the replaced versions
            # later: freeing a file's blocks is the expensive part of a delete.
            tmp = self._temp_name()
            try:
                os.rename(nm, tmp, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                os.unlink(nm, dir_fd=dfd)
            else:
                self._to_trash(dfd, paths.parent(path), tmp)
        else:
            os.unlink(nm, dir_fd=dfd)

    def rename(self, old: bytes, new: bytes) -> None:
        """Rename old to new within the root, replacing new."""
        sfd, snm = self._at(old)
        dfd, dnm = self._at(new, create_parents=True)
        is_dir = stat.S_ISDIR(os.stat(snm, dir_fd=sfd, follow_symlinks=False).st_mode)
        if is_dir:
            self.flush_trash()  # a crash must not leave old versions in a directory under its new name
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
        self.wait_cleanup()
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


class CachedReader:
    """Thread-safe reads under a root with a bounded cache of directory descriptors (serving side).

    Directories are opened component by component with O_NOFOLLOW, like ConfinedRoot. A cached
    descriptor follows its directory if it is renamed, so a read may find a file under the
    directory's new name or fail; callers verify the content hash after reading and retry with
    fresh=True, which makes a stale entry harmless.
    """

    def __init__(self, root: str | bytes, max_dirs: int = 512) -> None:
        self.root = os.fsencode(root)
        self.fd = os.open(self.root, _DIR_FLAGS)
        self.max_dirs = max_dirs
        self._dirs: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release descriptors."""
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
            os.close(self.fd)

    def _dir(self, dpath: bytes, fresh: bool) -> int:
        if not dpath:
            return self.fd
        fd = None if fresh else self._dirs.get(dpath)
        if fd is not None:
            self._dirs.move_to_end(dpath)
            return fd
        parent = self._dir(paths.parent(dpath), fresh)
        try:
            fd = os.open(paths.name(dpath), _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(f"{dpath!r}: a parent is not a directory (symlink?)") from e
            raise
        old = self._dirs.pop(dpath, None)
        if old is not None:
            os.close(old)
        self._dirs[dpath] = fd
        while len(self._dirs) > self.max_dirs:
            _, ofd = self._dirs.popitem(last=False)
            os.close(ofd)
        return fd

    def open_tmpfile(self, dpath: bytes, fresh: bool = False) -> int:
        """An unnamed O_TMPFILE file (O_RDWR) in directory dpath."""
        with self._lock:
            dfd = self._dir(dpath, fresh)
            return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd)

    def open_read(self, path: bytes, fresh: bool = False) -> int:
        """Open a file for reading without following symlinks; fresh=True re-resolves every parent."""
        paths.validate(path)
        with self._lock:
            dfd = self._dir(paths.parent(path), fresh)
            # O_NONBLOCK: a FIFO planted under the name must not block the server (no effect on files).
            return os.open(paths.name(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                           dir_fd=dfd)


def verify_digest(data: bytes, e: Entry, where: str) -> None:
    """Raise IntegrityError if data does not hash to e.hash."""
    from fleetsync.hashing import hash_bytes

    if len(data) != e.size or hash_bytes(data) != e.hash:
        raise IntegrityError(f"{where}: hash mismatch for blob {e.hash.hex()[:12]}…" if e.hash else where)


__all__ = ["ConfinedRoot", "CachedReader", "syncfs", "verify_digest", "FleetsyncError"]
