"""Hidden states of every calibration window, between two decoder blocks, on the host.

`ram` keeps them in memory and persists a copy per block for resuming; `disk` keeps them in a
memory-mapped file, so host memory holds only the pages in use. Files are raw bytes (torch
can map any dtype, bf16 included) named by the block they feed: acts_00012.bin feeds block 12.
"""
from __future__ import annotations

import os
from pathlib import Path
import torch


class ActivationStore:
    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool):
        self.folder, self.shape, self.dtype, self.on_disk = folder, tuple(shape), dtype, on_disk
        self.numel = 1
        for dim in self.shape:
            self.numel *= dim
        self.index: int | None = None
        self.tensor: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def path(self, index: int) -> Path:
        return self.folder / f"acts_{index:05d}.bin"

    def _mapped(self, path: Path, shared: bool) -> torch.Tensor:
        return torch.from_file(str(path), shared=shared, size=self.numel, dtype=self.dtype).view(self.shape)

    def _new_file(self, path: Path) -> torch.Tensor:
        with open(path, "wb") as f:
            f.truncate(self.numel * self.dtype.itemsize)
        return self._mapped(path, shared=True)

    def create(self, index: int) -> torch.Tensor:
        """An empty buffer to be filled, then commit(index)."""
        if self.on_disk:
            self._output = self._new_file(self._tmp(index))
        else:
            self._output = torch.empty(self.shape, dtype=self.dtype)
        return self._output

    def open(self, index: int) -> torch.Tensor:
        """The committed activations feeding block `index`."""
        self.index = index
        if self.on_disk:
            self.tensor = self._mapped(self.path(index), shared=True)
        else:
            self.tensor = torch.empty(self.shape, dtype=self.dtype)
            with open(self.path(index), "rb") as f:
                f.readinto(memoryview(self.tensor.reshape(-1).view(torch.uint8).numpy()))
        return self.tensor

    def output_buffer(self, index: int) -> torch.Tensor:
        """Where block index-1 writes its outputs. In RAM they overwrite the inputs sample by
        sample (the committed file still holds the inputs); on disk they go to a new file."""
        if self.on_disk:
            return self.create(index)
        self._output = self.tensor
        return self._output

    def commit(self, index: int) -> None:
        """Make the output buffer the durable input of block `index`, then drop the previous file."""
        tmp = self._tmp(index)
        if not self.on_disk:
            with open(tmp, "wb") as f:
                self._output.reshape(-1).view(torch.uint8).numpy().tofile(f)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(index))
        previous = self.index
        self.tensor, self.index, self._output = self._output, index, None
        if previous is not None and previous != index:
            self.path(previous).unlink(missing_ok=True)

    def _tmp(self, index: int) -> Path:
        return self.path(index).with_suffix(".bin.tmp")
