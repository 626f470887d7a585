"""Hidden states of every calibration window, between two decoder blocks, on the host.

`ram` keeps them in memory and persists a copy per block for resuming; `disk` keeps them in a
memory-mapped file, so host memory holds only the pages in use. Files are raw bytes (torch
can map any dtype, bf16 included) named by the block they feed: acts_00012.bin feeds block 12
(acts_00012.rank1.bin: the share of rank 1, across torchrun ranks).
A committed file is only ever read (mapped read-only on disk), never created by reading it; the
run state decides when an old one is deleted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import durable


class ActivationStore:
    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool, pin: bool = False,
                 tag: str = ""):
        self.folder, self.shape, self.dtype, self.on_disk, self.tag = folder, tuple(shape), dtype, on_disk, tag
        self.pin = pin and not on_disk  # page-locked RAM: copies to and from a GPU run asynchronously
        self.numel = 1
        for dim in self.shape:
            self.numel *= dim
        self.tensor: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

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
        else:
            self._output = self._empty()
        return self._output

    def open(self, index: int) -> torch.Tensor:
        """The committed activations feeding block `index` (checked by the run state beforehand)."""
        path = self.path(index)
        if self.on_disk:
            self.tensor = self._mapped(path, shared=False)
        else:
            self.tensor = self._empty()
            with open(path, "rb") as f:
                f.readinto(self._bytes(self.tensor))
        return self.tensor

    def _empty(self) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
            except RuntimeError:  # the system's page-locked limit: pageable memory works, only slower
                self.pin = False
        return torch.empty(self.shape, dtype=self.dtype)

    def output_buffer(self, index: int) -> torch.Tensor:
        """Where block index-1 writes its outputs. In RAM they overwrite the inputs sample by
        sample (the committed file still holds the inputs); on disk they go to a new file."""
        if self.on_disk:
            return self.create(index)
        self._output = self.tensor
        return self._output

    def commit(self, index: int) -> durable.FileRecord:
        """Make the output buffer the durable input of block `index`; it becomes `tensor`."""
        return self.advance()(index)

    def advance(self) -> Callable[[int], durable.FileRecord]:
        """The output buffer becomes `tensor` now; the returned `persist(index)` makes it the durable input
        of block `index` later (another thread may call it; in RAM it reads the buffer, which nothing
        may overwrite until it returns)."""
        filled, self.tensor, self._output = self._output, self._output, None

        def persist(index: int) -> durable.FileRecord:
            if self.on_disk:
                return durable.write_file(self.path(index), lambda tmp: None)  # filled through the mapping
            return durable.write_bytes(self.path(index), self._bytes(filled))
        return persist

    def release(self) -> None:
        self.tensor = self._output = None

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> memoryview:
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
