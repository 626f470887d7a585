"""Every change a run makes on disk, as numbered steps: write, fsync, rename, delete.

A file is written to `NAME.tmp`, fsynced, renamed into place, and its directory fsynced, so after
a crash at any instant a file is either absent or whole. What a run considers committed is what
its manifest names, with the size and CRC-32 each file had when it was written (`FileRecord`).

The steps are numbered so that tests can stop the process at each one in turn:
OFFLOAD_PRUNE_KILL_AT_STEP=k sends the process OFFLOAD_PRUNE_KILL_SIGNAL (default KILL) at step
k, or at the first step of that kind on a path with that ending when given as KIND:ENDING
(`rename:acts_00001.bin`); a write stopped there leaves half its temporary file, as a crash
mid-write does. OFFLOAD_PRUNE_STEP_LOG=FILE appends one line per step ("k kind path") to FILE.
"""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import signal
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config import OffloadPruneError

TMP_SUFFIX = ".tmp"
_CHUNK = 16 << 20
#: The aligned buffer a file written around the page cache goes through (counted in the memory plan).
DIRECT_STAGING_BYTES = 4 << 20
#: O_DIRECT wants the memory, the file offset and the length of each write aligned to the logical block
#: size: 512 or 4096 bytes on the disks Linux knows; a filesystem asking more refuses (EINVAL) and the
#: file is written through the cache instead.
_DIRECT_ALIGNMENT = 4096


class DiskFullError(OffloadPruneError):
    """A write failed for lack of space or over the file-size limit; the run can resume afterwards."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class FileRecord:
    size: int
    crc32: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Steps:
    """The step counter of this process (environment read once, at first use)."""

    def __init__(self):
        self.count = 0
        at = os.environ.get("OFFLOAD_PRUNE_KILL_AT_STEP", "")
        self.kill_at: int | tuple[str, str] | None = int(at) if at.isdigit() else (
            tuple(at.split(":", 1)) if ":" in at else None)
        self.fired = False
        self.signal = getattr(signal, "SIG" + os.environ.get("OFFLOAD_PRUNE_KILL_SIGNAL", "KILL"))
        self.log = os.environ.get("OFFLOAD_PRUNE_STEP_LOG")

    def __call__(self, kind: str, path: Path, torn: Path | None = None) -> None:
        """Called right after a step took effect. `torn`: the temporary file a write step made."""
        self.count += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{self.count} {kind} {path}\n")
        due = self.count == self.kill_at if isinstance(self.kill_at, int) else (
            self.kill_at is not None and kind == self.kill_at[0] and str(path).endswith(self.kill_at[1]))
        if due and not self.fired:
            self.fired = True  # a stopped (SIGSTOP) or interrupted process may go on: fire once
            if torn is not None and self.signal == signal.SIGKILL:
                _tear(torn)
            os.kill(os.getpid(), self.signal)


def _tear(path: Path) -> None:
    """A crash mid-write: the second half of the data never reached the disk. Zeroed in place rather
    than truncated: another thread may be reading the file through a memory map (the disk activation
    store), and a read past a truncated end is a SIGBUS before the kill lands."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))


_steps: _Steps | None = None


def step(kind: str, path: Path, torn: Path | None = None) -> None:
    global _steps
    if _steps is None:
        _steps = _Steps()
    _steps(kind, path, torn)


def reset_steps() -> None:
    """Forget the counter (a test worker re-reads the environment in each forked run)."""
    global _steps
    _steps = None


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def write_file(path: Path, write: Callable[[Path], int | None]) -> FileRecord:
    """Create or replace `path` atomically: `write(tmp)` fills the temporary file, which is then
    fsynced and renamed into place. The directory entry is made durable by `sync_dir`.
    `write` may return the CRC-32 of the bytes it wrote, computed from memory; otherwise the file is
    read back for it (for a model larger than the page cache, a second disk read of all it writes)."""
    tmp = tmp_path(path)
    crc = _writing(tmp, path, write)
    if crc is not None and not isinstance(crc, int):
        raise TypeError(f"writing {path.name} returned {crc!r}, not a CRC-32 or None")
    step("write", tmp, torn=tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    step("fsync", tmp)
    record = checksum(tmp) if crc is None else FileRecord(tmp.stat().st_size, crc)
    os.replace(tmp, path)
    step("rename", path)
    return record


def reserve_tmp(path: Path, nbytes: int) -> Path:
    """The temporary file of `path` with `nbytes` allocated (filled later through a memory map). The
    space is allocated now, so a full disk fails here, not as a SIGBUS on a write through the map."""
    tmp = tmp_path(path)

    def allocate(target: Path) -> None:
        with open(target, "wb") as f:
            if nbytes:
                os.posix_fallocate(f.fileno(), 0, nbytes)

    _writing(tmp, path, allocate)
    step("write", tmp)
    return tmp


def _writing(tmp: Path, path: Path, write: Callable[[Path], int | None]) -> int | None:
    try:
        return write(tmp)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        reason = _space_reason(exc)
        if reason:
            raise DiskFullError(path, reason) from None
        raise


def write_bytes(path: Path, data: bytes | memoryview) -> FileRecord:
    return write_file(path, lambda tmp: write_around_cache(tmp, lambda: [memoryview(data)]))


def write_around_cache(path: Path, pieces: Callable[[], Iterable[memoryview]]) -> int:
    """Write the byte pieces `pieces()` yields one after another to `path`; returns their CRC-32.

    Where the OS and the filesystem allow, around the page cache (O_DIRECT), through one aligned
    staging buffer: what a run writes (shards, activations kept for resuming) it does not read again,
    and through the cache every byte took one more kernel copy and its dirty pages a write-back, ~2.5 s
    of CPU per GB on a 2-core VM, on the cores the pruning computes on (about 1 s per GB this way, the
    CRC included); it also leaves the page cache to the checkpoint being read. Elsewhere (no O_DIRECT,
    or a filesystem that refuses it): buffered writes, `pieces()` started again."""
    if hasattr(os, "O_DIRECT"):
        try:
            return _write_direct(path, pieces())
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    crc = 0
    with open(path, "wb") as f:
        for piece in pieces():
            f.write(piece)
            crc = zlib.crc32(piece, crc)
            del piece  # a strided tensor's contiguous copy goes before the next one is made
    return crc


def _write_direct(path: Path, pieces: Iterable[memoryview]) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    staging = mmap.mmap(-1, DIRECT_STAGING_BYTES)  # page-aligned
    buffer = memoryview(staging)
    try:
        crc = size = filled = 0
        for piece in pieces:
            crc, size = zlib.crc32(piece, crc), size + len(piece)
            taken = 0
            while taken < len(piece):
                n = min(len(piece) - taken, len(buffer) - filled)
                buffer[filled:filled + n] = piece[taken:taken + n]
                filled, taken = filled + n, taken + n
                if filled == len(buffer):
                    _write_all(fd, buffer)
                    filled = 0
            del piece
        if filled:  # the last block padded with zeros, then cut off
            padded = filled + (-filled % _DIRECT_ALIGNMENT)
            buffer[filled:padded] = bytes(padded - filled)
            _write_all(fd, buffer[:padded])
            os.ftruncate(fd, size)
        return crc
    finally:
        os.close(fd)
        try:
            buffer.release()
            staging.close()
        except BufferError:  # views of it held by an error's traceback: unmapped when that goes
            pass


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data):]


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view, on its own device (any dtype, bf16 included)."""
    return tensor.reshape(-1).view(torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(flat_bytes(tensor).numpy())


def write_text(path: Path, text: str) -> FileRecord:
    return write_bytes(path, text.encode())


def copy_file(source: Path, path: Path) -> FileRecord:
    def copy(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
    return write_file(path, copy)


def sync_dir(folder: Path) -> None:
    """Make renames and deletions in `folder` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    step("fsync-dir", folder)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    step("delete", path)


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    step("mkdir", path)


def checksum(path: Path) -> FileRecord:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return FileRecord(path.stat().st_size, crc)


def damage(path: Path, expected: dict) -> str | None:
    """Why `path` is not the file recorded as `expected` (a FileRecord dict), or None if it is."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{size} bytes, {expected['size']} recorded"
    if checksum(path).crc32 != expected["crc32"]:
        return "checksum differs from the one recorded"
    return None


def _space_reason(exc: BaseException) -> str | None:
    """'no space left on device' / 'over the file-size limit' when that is why a write failed.
    safetensors reports I/O errors as its own exception type, with the OS error in the text."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "no space left on device"
    if code == errno.EFBIG or "File too large" in text or "os error 27" in text:
        return "file larger than this process's file-size limit (ulimit -f)"
    if code == errno.EDQUOT or "Disk quota" in text:
        return "disk quota exceeded"
    return None
