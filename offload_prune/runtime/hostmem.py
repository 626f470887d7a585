"""Keep freed block weights from staying in the process's RSS.

glibc raises its mmap threshold each time a large mmapped chunk is freed, after which blocks of
that size come from the heap, where fragmentation keeps them: RSS then creeps up block after
block although nothing is alive. Fixing the threshold keeps large tensors mmapped, returned to
the OS on free, so host memory stays set by one block whatever the number of layers.
It costs time: every tensor of 1-32 MiB is a fresh mapping whose pages fault in again (~20 s of a
64 s streamed Wanda run on a 2 GB checkpoint; most of it was the mask selection, which now works in
chunks whose temporaries stay below the threshold: masks.HOST_CHUNK_ELEMENTS). A 32 MiB threshold
with malloc_trim after each block removes the rest with flat RSS, but peaks inside a phase then
depend on heap reuse and went up to 35 % over the memory plan under load (CI): not taken until the
plan can count it. What is taken instead: the threshold is raised only while windows run through a
block on the CPU (`heap_for_temporaries`), whose temporaries are then reused from the heap, and set back
with a malloc_trim after; block weights, loaded and freed outside, stay mapped. Streamed Wanda on
SmolLM2: prune phase 82.9 -> 71.6 s (interleaved pairs), the same weights, peaks within the plan.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from typing import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
#: glibc's default: free memory over this at the top of a heap goes back to the OS at once (fixed
#: once M_MMAP_THRESHOLD is set by hand, which turns glibc's dynamic adjustment off).
TRIM_THRESHOLD_BYTES = 128 << 10


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library already loaded in the process, when it has glibc's mallopt and malloc_trim. Looked up
    once: it is asked around every pass of windows, and ctypes.util.find_library ran ldconfig each time."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_large_allocations_mmapped() -> bool:
    """True when glibc accepted the setting; a no-op elsewhere (macOS, musl)."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


#: While the windows run through a block on the CPU, its temporaries (hidden states, MLP intermediates,
#: attention scores: 1-32 MiB each) come from the heap and are reused call after call, instead of being
#: fresh mappings whose pages fault in again each time (26 s of an 86 s streamed Wanda run on SmolLM2).
FORWARD_MMAP_THRESHOLD_BYTES = 32 << 20
#: ... and the heap is not trimmed while they run: at the default threshold every free at the top of a
#: heap (each thread has its own) gave its pages back and the next allocation faulted them in again:
#: 4.9 million page faults and 10 s of system time in a 56 s streamed Wanda run on SmolLM2 (1.0 million
#: and 2.7 s without). The trim after the windows hands everything back.
FORWARD_TRIM_THRESHOLD_BYTES = 1 << 30  # mallopt takes a C int


@contextlib.contextmanager
def heap_for_temporaries(active: bool = True) -> Iterator[None]:
    """Within: allocations under FORWARD_MMAP_THRESHOLD_BYTES come from the heap. After: large ones are
    mapped again and the heap's free pages go back to the OS, so what the forwards freed does not stay in
    the RSS (block weights, loaded outside, stay mapped and are returned when freed)."""
    libc = _libc() if active else None
    if libc is None:
        yield
        return
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, FORWARD_TRIM_THRESHOLD_BYTES)
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.malloc_trim(0)


def release_free_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc malloc_trim), so that what
    a finished phase freed does not stay in the RSS the next phase starts from."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


@contextlib.contextmanager
def collector_sees_only_new_objects() -> Iterator[None]:
    """Everything alive now (modules, tokenizer, what transformers and torch keep) is moved out of the
    garbage collector's sight (gc.freeze) until the run ends: the full collection after each block,
    which frees the block's tensors caught in reference cycles, and the one as each phase starts then scan
    only what the run made (scanning every object of the process took ~5 % of a streamed Wanda run). A
    process that froze its objects itself (a server before it forks) is left as it is: unfreezing at the end
    would hand them back to the collector."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
