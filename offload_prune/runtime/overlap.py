"""Disk work beside compute: while the main thread computes block i, one helper thread reads block
i+1's tensors and another writes block i-1's shards and commits it.

Crash safety does not change: a block's commit (shards fsynced, directory synced, manifest replaced)
is the same sequence of steps, in the same order, only on another thread; the main thread waits for
it before the next commit could be made and before anything reads what it writes. At most one job
of each kind is in flight, so the memory it holds is one block (counted in the plan). With
`enabled=False` everything runs inline, in the order it is asked for.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Behind:
    """Jobs run one after another on one helper thread, at most one pending: `submit` first waits for
    the job before it, so its error surfaces at the next submit, `wait` or `close`."""

    def __init__(self, enabled: bool, name: str):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name) if enabled else None
        self._pending: Future | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Lets the job in flight finish (a block half written would only be redone on resume, but its
        files must not be cut by the interpreter's exit) and stops the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = None  # anything after runs inline


class ReadAhead:
    """`read(names)` for the next key, started early on a helper thread; `take` returns it when the
    key matches what was started, and reads inline otherwise (a resume, or another order)."""

    def __init__(self, read: Callable[[list[str]], dict], enabled: bool):
        self._read = read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if enabled else None
        self._key: Any = None
        self._pending: Future | None = None

    def start(self, key: Any, names: list[str]) -> None:
        if self._pool is None:
            return
        self.drop()
        self._key, self._pending = key, self._pool.submit(self._read, names)

    def take(self, key: Any, names: list[str]) -> dict:
        pending, started = self._pending, self._key
        self._pending = self._key = None
        if pending is not None and started == key:
            return pending.result()
        if pending is not None:
            pending.result()  # finish (and free) a read nobody wants before reading again
        return self._read(names)

    def drop(self) -> None:
        pending, self._pending, self._key = self._pending, None, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.drop()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = None  # anything after runs inline
