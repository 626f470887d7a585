"""ShortGPT (Men et al. 2024): no weight is pruned; the blocks with the lowest Block Influence are
removed whole. The pipeline measures the influence in a dense pass (block_removal.py)."""
from __future__ import annotations

import torch

from ..model.matrices import Matrix
from .base import PruningMethod


class ShortGPT(PruningMethod):
    needs_calibration = False
    removes_blocks = True
    options = ("remove_layers", "target_params", "angular")

    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        raise RuntimeError("shortgpt removes blocks; it never prunes matrices")

    def memory_bytes(self, linears: dict[str, Matrix], compute_dtype: torch.dtype, device_type: str) -> dict[str, int]:
        return {"statistics": 0, "prune": 0}
