"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row.

||X_j||_2 is the norm of input feature j over every calibration token. On the CPU the squares are
summed in float64, so the sum does not depend on how tokens were split into micro-batches; on a
GPU in float32 (consumer GPUs run float64 at a small fraction of their speed).
"""
from __future__ import annotations

import weakref

import torch

from ..model.matrices import Matrix
from ..runtime.distributed import Ranks
from ..surgery.neurons import InputMoments, MlpUnit, fold_rows, statistics_dtype
from .base import ScoreMaskMethod


class Wanda(ScoreMaskMethod):
    per_row = True
    runs_on_ranks = True
    reads_outputs = False  # input norms only

    def __init__(self, config):
        super().__init__(config)
        self.sum_squares: dict[str, torch.Tensor] = {}
        # q/k/v (and gate/up) are handed one tensor in turn: its squares are summed once. A weak
        # reference, so that the input is not kept alive past the forward that made it.
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        if self._last is None or self._last[0]() is not inputs:
            x = inputs.reshape(-1, inputs.shape[-1])
            x = x.to(statistics_dtype(x.device))
            self._last = (weakref.ref(inputs), (x * x).sum(dim=0))
        squares = self._last[1]
        if name in self.sum_squares:
            self.sum_squares[name] += squares
        else:
            self.sum_squares[name] = squares.clone()

    def reduce_statistics(self, ranks: Ranks, linears: dict[str, Matrix]) -> None:
        self._last = None
        def empty(name: str) -> torch.Tensor:
            device = linears[name].weight.device
            return torch.zeros(linears[name].in_features, device=device, dtype=statistics_dtype(device))
        ranks.sum_named(self.sum_squares, list(linears), empty)

    def discard(self, names: list[str]) -> None:
        self._last = None
        for name in names:
            self.sum_squares.pop(name, None)

    def statistics_bytes(self, linears) -> int:
        return sum(m.in_features * 8 for m in linears.values())  # float64 sums of squares (at most)

    def scorer(self, name: str, weight: torch.Tensor):
        input_norm = self.sum_squares.pop(name).sqrt().to(weight.device, torch.float32)
        return lambda rows: weight[rows].float().abs().mul_(input_norm)

    def neuron_scores(self, unit: MlpUnit, moments: InputMoments | None) -> torch.Tensor:
        """The neuron's summed Wanda score: |W_ij| * ||X_j|| over its rows and its column."""
        out = unit.output.weight.double()
        scores = out.abs().sum(0) * self.sum_squares.pop(unit.output.name).to(out.device, torch.float64).sqrt()
        for m in unit.inputs:
            norms = self.sum_squares.pop(m.name).to(out.device, torch.float64).sqrt()
            scores += fold_rows(m.weight.double().abs() @ norms, m, unit.neurons)
        return scores
