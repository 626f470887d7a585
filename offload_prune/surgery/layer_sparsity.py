"""How sparse each block is pruned: uniform, OWL, or ratios the user gives in a JSON file.

OWL (Outlier-Weighted Layerwise sparsity; Yin et al., ICML 2024). In a dense pass, block l's
outlier ratio D_l is the fraction of its Wanda scores |W_ij| * ||X_j||_2 (over every matrix the
block prunes, with the block's dense inputs) above M times their mean (M = --owl-m). Blocks with
more outliers keep more weights:

    d_l = 2 lambda (D_l - min D) / (max D - min D)          (the paper's scaling to [0, 2 lambda])
    s_l = clip(S - d_l + c, S - lambda, S + lambda)          (lambda = --owl-lambda, S = --sparsity_ratio)

with the constant c chosen so the mean of s_l, weighted by each block's prunable weights, is S:
the total sparsity stays the requested one, and every block is within lambda of it (the paper's
constraint; its reference code can overshoot lambda by a shift of up to lambda).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import OffloadPruneError
from ..model.matrices import Matrix
from .neurons import statistics_dtype

BISECTION_STEPS = 100


class OutlierCounter:
    """Wanda's input norms for one block's matrices, then the fraction of outlier scores."""

    def __init__(self):
        self.sum_squares: dict[str, torch.Tensor] = {}

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        x = x.to(statistics_dtype(x.device))  # on a GPU float32, as Wanda: a float64 copy is not planned
        squares = (x * x).sum(dim=0)
        self.sum_squares[name] = self.sum_squares[name] + squares if name in self.sum_squares else squares

    @torch.no_grad()
    def outlier_ratio(self, matrices: dict[str, Matrix], m: float) -> tuple[float, int]:
        """(fraction of the block's scores above m x their mean, number of scores)."""
        def scores(name: str, matrix: Matrix) -> torch.Tensor:
            norms = self.sum_squares.get(name)
            norms = torch.zeros(matrix.in_features) if norms is None else norms.sqrt()
            return matrix.weight.detach().float().abs() * norms.to(matrix.weight.device, torch.float32)

        total, count = 0.0, 0
        for name, matrix in matrices.items():
            total += float(scores(name, matrix).double().sum())
            count += matrix.weight.numel()
        threshold = m * total / max(count, 1)
        above = sum(int((scores(name, matrix) > threshold).sum()) for name, matrix in matrices.items())
        return above / max(count, 1), count


def owl_ratios(outlier_ratios: list[float], weights: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsity from the outlier ratios (see the module's text)."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    size = torch.tensor(weights, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)

    def ratios(shift: float) -> torch.Tensor:
        return (target - scaled + shift).clamp(target - lam, target + lam)

    def weighted_mean(shift: float) -> float:
        return float((ratios(shift) * size).sum() / size.sum())

    low, high = -2 * lam, 2 * lam  # the weighted mean rises with the shift, from S - lam to S + lam
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if weighted_mean(middle) < target else (low, middle)
    return ratios((low + high) / 2).tolist()


def ratios_from_file(path: str, num_layers: int) -> list[float]:
    """A JSON list with one sparsity per block, or a report.json of an earlier run (its layer ratios)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OffloadPruneError(f"--layer-sparsity {path}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict):
        data = (data.get("layer_sparsity") or {}).get("ratios")
    if not (isinstance(data, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)):
        raise OffloadPruneError(f"--layer-sparsity {path}: expected a JSON list of numbers, one per block "
                                "(or a report.json with layer_sparsity.ratios)")
    if len(data) != num_layers:
        raise OffloadPruneError(f"--layer-sparsity {path}: {len(data)} ratios for a model of {num_layers} blocks")
    bad = [i for i, v in enumerate(data) if not 0 <= v < 1]
    if bad:
        raise OffloadPruneError(f"--layer-sparsity {path}: block {bad[0]}'s ratio {data[bad[0]]} is not in [0, 1)")
    return [float(v) for v in data]
