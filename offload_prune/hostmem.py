"""Keep freed block weights from staying in the process's RSS.

glibc raises its mmap threshold each time a large mmapped chunk is freed, after which blocks of
that size come from the heap, where fragmentation keeps them: RSS then creeps up block after
block although nothing is alive. Fixing the threshold keeps large tensors mmapped, returned to
the OS on free, so host memory stays set by one block whatever the number of layers.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 20


def keep_large_allocations_mmapped() -> bool:
    """True when glibc accepted the setting; a no-op elsewhere (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
