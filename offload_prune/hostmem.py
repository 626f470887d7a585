"""Keep freed block weights from staying in the process's RSS.

glibc raises its mmap threshold each time a large mmapped chunk is freed, after which blocks of
that size come from the heap, where fragmentation keeps them: RSS then creeps up block after
block although nothing is alive. Fixing the threshold keeps large tensors mmapped, returned to
the OS on free, so host memory stays set by one block whatever the number of layers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def keep_large_allocations_mmapped() -> bool:
    """True when glibc accepted the setting; a no-op elsewhere (macOS, musl)."""
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
    except AttributeError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc malloc_trim), so that what
    a finished phase freed does not stay in the RSS the next phase starts from."""
    gc.collect()
    libc = _libc()
    try:
        if libc:
            libc.malloc_trim(0)
    except AttributeError:
        pass

