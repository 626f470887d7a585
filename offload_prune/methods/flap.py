"""FLAP (An et al., AAAI 2024), for whole MLP neurons: the fluctuation of neuron n,
Var_t(x_n) * ||W_out[:, n]||^2, says how much the output moves with it; a removed neuron's mean
contribution W_out[:, n] E[x_n] is added to the output matrix's bias (bias compensation). Only with
--sparsity_type structured; the moments are collected by methods/structured.py."""
from __future__ import annotations

import torch

from ..surgery.neurons import InputMoments, MlpUnit
from .base import PruningMethod


class FLAP(PruningMethod):
    compensates_bias = True

    def neuron_scores(self, unit: MlpUnit, moments: InputMoments | None) -> torch.Tensor:
        column_squares = unit.output.weight.double().pow(2).sum(0)
        return moments.variance.to(column_squares.device, torch.float64) * column_squares
