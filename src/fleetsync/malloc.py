"""glibc allocator controls for long-running processes (no-ops where libc lacks them)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

log = logging.getLogger("fleetsync")

#: mallopt() parameter number of M_MMAP_THRESHOLD in glibc's malloc.h.
M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own mapping, returned to the kernel when freed.
MMAP_THRESHOLD = 128 << 10

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
            _libc.malloc_trim  # noqa: B018 - probe: glibc only
            _libc.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc


def trim() -> None:
    """malloc_trim(0): release free heap pages of every arena to the kernel."""
    if lib := _lib():
        lib.malloc_trim(0)


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of nbytes or more from their own mappings, always; True if set.

    glibc starts at 128 KiB but raises the threshold to the size of each mapped block freed (up
    to 32 MiB), after which the ~1 MiB buffers a server reads content into come from the heap
    and stay there, fragmented, after they are freed. A fixed threshold turns that adaptation off.
    An operator's MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not (lib := _lib()):
        return False
    ok = bool(lib.mallopt(M_MMAP_THRESHOLD, nbytes))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", nbytes)
    return ok
