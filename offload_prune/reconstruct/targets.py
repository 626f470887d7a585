"""Where a block's reconstruction target lives while the block trains.

`dense-block`: the dense block's outputs on the same (pruned-stream) inputs, computed before the mask is
applied, into a buffer kept beside the activation cache (in RAM, on the device, or in a scratch file on
disk, as the cache is). It is rebuilt for every block, so a resume needs nothing of it: it is not part of
the durable run state. `dense-stream`: the dense model's own outputs, carried block to block in a second,
durable activation cache (stream/reconstruction.py), not here.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..disk.durable import TMP_SUFFIX

#: The scratch file of a `dense-block` target kept on disk, in the output folder: rewritten for every block,
#: never committed, and a killed run's is removed on resume with the other temporary files.
SCRATCH_NAME = ".recon-target"


class TargetBuffer:
    """One block's target outputs for every calibration window of this rank."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, where: str, device: torch.device,
                 folder: Path, tag: str = ""):
        self.shape, self.dtype, self.where, self.device = tuple(shape), dtype, where, device
        self.path = folder / (SCRATCH_NAME + tag + TMP_SUFFIX)
        self._tensor: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        """The buffer, made on first use and reused for every block."""
        if self._tensor is None:
            if self.where == "disk":
                self._tensor = torch.from_file(str(self.path), shared=True, size=math.prod(self.shape),
                                               dtype=self.dtype).view(self.shape)
            elif self.where == "device":
                self._tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            else:
                try:  # page-locked when a GPU computes: the copies per micro-batch run asynchronously
                    self._tensor = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
                except RuntimeError:  # the system's page-locked limit
                    self._tensor = torch.empty(self.shape, dtype=self.dtype)
        return self._tensor

    def release(self) -> None:
        self._tensor = None
        self.path.unlink(missing_ok=True)
