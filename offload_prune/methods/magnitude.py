"""Magnitude pruning: |W|, one threshold per matrix (as the SparseGPT repository's --gmp)."""
from __future__ import annotations

import torch

from ..surgery.neurons import InputMoments, MlpUnit, neuron_norms
from .base import ScoreMaskMethod


class Magnitude(ScoreMaskMethod):
    needs_calibration = False
    runs_on_ranks = True
    per_row = False

    def scorer(self, name: str, weight: torch.Tensor):
        return lambda rows: weight[rows].float().abs()

    def neuron_scores(self, unit: MlpUnit, moments: InputMoments | None) -> torch.Tensor:
        """The L2 norm of the neuron's weights (its rows and its column)."""
        return neuron_norms(unit)
