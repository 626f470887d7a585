"""Magnitude pruning: |W|, one threshold per matrix (as the SparseGPT repository's --gmp)."""
from __future__ import annotations

import torch

from .base import ScoreMaskMethod


class Magnitude(ScoreMaskMethod):
    needs_calibration = False
    per_row = False

    def scorer(self, name: str, weight: torch.Tensor):
        return lambda rows: weight[rows].float().abs()
