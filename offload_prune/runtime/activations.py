"""Hidden states of every calibration window, between two decoder blocks.

`ram` keeps them in host memory and persists a copy per block for resuming; `disk` keeps them in a
memory-mapped file, so host memory holds only the pages in use; `device` keeps them in the compute
device's memory (on a GPU: no copy to or from the host per micro-batch) and persists them through a
small host buffer. Files are raw bytes (torch can map any dtype, bf16 included) named by the block
they feed: acts_00012.bin feeds block 12 (acts_00012.rank1.bin: the share of rank 1, across torchrun
ranks), the same whichever store wrote them, so a run may resume with another.
A committed file is only ever read (mapped read-only on disk), never created by reading it; the
run state decides when an old one is deleted.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..disk import durable

#: The device store goes through host memory in pieces of this size when it is persisted or reopened.
STAGING_BYTES = 16 << 20


def pinned_bytes(nbytes: int) -> int:
    """What a page-locked buffer of `nbytes` takes: PyTorch's host caching allocator rounds every request
    up to a power of two (a 2.5 GiB cache takes 4 GiB)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def empty_pinned_cache() -> None:
    """Hand freed page-locked blocks back to the system: the host caching allocator keeps them otherwise."""
    accelerator = getattr(torch, "accelerator", None)
    empty = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def may_copy_asynchronously(target: torch.Tensor) -> bool:
    """Whether a copy from a GPU into `target` may return before it is done: into device or page-locked
    memory only. Into pageable memory (a memory-mapped activation file, whose bytes are summed right
    after) CUDA 12 does not promise the copy is finished on return (HMM/ATS systems)."""
    return target.device.type != "cpu" or target.is_pinned()


class ActivationStore:
    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: torch.dtype, where: str = "ram",
                 device: torch.device = torch.device("cpu"), tag: str = ""):
        if where not in ("ram", "disk", "device"):
            raise ValueError(f"an activation store is in ram, on disk or on the device, not {where!r}")
        self.folder, self.shape, self.dtype, self.where, self.tag = folder, tuple(shape), dtype, where, tag
        self.on_disk = where == "disk"
        self.device = device if where == "device" else torch.device("cpu")
        # Page-locked host memory (the RAM cache, or the device cache's staging buffer): copies to and from
        # a GPU then run asynchronously.
        self.pin = not self.on_disk and device.type == "cuda"
        self.numel = 1
        for dim in self.shape:
            self.numel *= dim
        self.tensor: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        # On disk: (CRC-32, rows) of the output buffer's rows written so far, in order (None: not in order).
        self._summed: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def name(self, index: int) -> str:
        return f"acts_{index:05d}{self.tag}.bin"

    def path(self, index: int) -> Path:
        return self.folder / self.name(index)

    def _mapped(self, path: Path, shared: bool) -> torch.Tensor:
        # shared=False maps read-only and fails on a missing file (shared=True would create it).
        return torch.from_file(str(path), shared=shared, size=self.numel, dtype=self.dtype).view(self.shape)

    def create(self, index: int) -> torch.Tensor:
        """An empty buffer to be filled, then commit(index)."""
        if self.on_disk:
            self._output = self._mapped(durable.reserve_tmp(self.path(index), self.nbytes), shared=True)
            self._summed = (0, 0)
        else:
            self._output = self._empty()
        return self._output

    def open(self, index: int) -> torch.Tensor:
        """The committed activations feeding block `index` (checked by the run state beforehand)."""
        path = self.path(index)
        if self.on_disk:
            self.tensor = self._mapped(path, shared=False)
        elif self.where == "device":
            self.tensor = self._empty()
            with open(path, "rb") as f:
                for host, device in self._staged(self.tensor):
                    f.readinto(durable.tensor_bytes(host))
                    device.copy_(host)
        else:
            self.tensor = self._empty()
            with open(path, "rb") as f:
                f.readinto(durable.tensor_bytes(self.tensor))
        return self.tensor

    def _empty(self) -> torch.Tensor:
        if self.where == "device":
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._host(self.shape, self.dtype)

    def _staged(self, tensor: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The device tensor's bytes a piece at a time: (one host staging buffer, reused; the piece's bytes
        on the device)."""
        flat = durable.flat_bytes(tensor)
        staging = self._host((min(STAGING_BYTES, self.nbytes),), torch.uint8)
        for start in range(0, flat.numel(), staging.numel()):
            device = flat[start:start + staging.numel()]
            yield staging[:device.numel()], device

    def _host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:  # the system's page-locked limit: pageable memory works, only slower
                self.pin = False
        return torch.empty(shape, dtype=dtype)

    def output_buffer(self, index: int) -> torch.Tensor:
        """Where block index-1 writes its outputs. In RAM they overwrite the inputs sample by
        sample (the committed file still holds the inputs); on disk they go to a new file."""
        if self.on_disk:
            return self.create(index)
        self._output = self.tensor
        return self._output

    def written(self, rows: slice) -> None:
        """`rows` of the output buffer were just filled (on disk: copied into the mapping, which a copy from
        a GPU to pageable memory finishes before returning). Their bytes are summed now, while in memory, if
        they come in order: the file's CRC-32 is then known without reading it back, which for a file larger
        than the page cache is a second disk read of it."""
        if self._summed is None:
            return
        crc, done = self._summed
        chunk = self._output[rows]
        self._summed = (zlib.crc32(durable.tensor_bytes(chunk), crc), done + chunk.shape[0]) \
            if rows.start == done else None

    def commit(self, index: int) -> durable.FileRecord:
        """Make the output buffer the durable input of block `index`; it becomes `tensor`."""
        return self.advance()(index)

    def advance(self) -> Callable[[int], durable.FileRecord]:
        """The output buffer becomes `tensor` now; the returned `persist(index)` makes it the durable input
        of block `index` later (another thread may call it; in RAM it reads the buffer, which nothing
        may overwrite until it returns)."""
        filled, self.tensor, self._output = self._output, self._output, None
        summed = self._summed if self._summed is not None and self._summed[1] == self.shape[0] else None
        self._summed = None

        # On a GPU the device cache is copied out on a stream of its own, after what filled it: the next
        # block's compute on the default stream does not queue behind the copies.
        ready = None
        if self.where == "device" and self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))

        def persist(index: int) -> durable.FileRecord:
            if self.on_disk:  # filled through the mapping; read back unless every row was summed as written
                return durable.write_file(self.path(index), lambda tmp: summed[0] if summed else None)
            if self.where == "device":
                return durable.write_file(self.path(index), lambda tmp: self._write_staged(tmp, filled, ready))
            return durable.write_bytes(self.path(index), durable.tensor_bytes(filled))
        return persist

    def _write_staged(self, tmp: Path, filled: torch.Tensor, ready=None) -> int:
        """The device cache's bytes into `tmp` a staging buffer at a time; their CRC-32. `ready`: the CUDA
        event after which the cache is complete."""
        if ready is None:  # copy_ to host memory waits for the device: the bytes are there when written
            return durable.write_around_cache(tmp, lambda: (durable.tensor_bytes(host.copy_(device))
                                                           for host, device in self._staged(filled)))
        stream = torch.cuda.Stream(self.device)
        stream.wait_event(ready)

        def pieces():
            for host, device in self._staged(filled):
                with torch.cuda.stream(stream):
                    host.copy_(device, non_blocking=may_copy_asynchronously(host))
                stream.synchronize()  # the staging buffer is written out only once its copy is done
                yield durable.tensor_bytes(host)
        return durable.write_around_cache(tmp, pieces)

    def release(self) -> None:
        """Free the cache now, and hand it back to the system rather than to torch's caches: the phases
        after the blocks (write, evaluation) are planned without it."""
        held = self.tensor is not None or self._output is not None
        self.tensor = self._output = self._summed = None
        if not held:
            return
        if self.where == "device" and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.pin:
            empty_pinned_cache()
