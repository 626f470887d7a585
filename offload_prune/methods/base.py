"""What every pruning method provides to the block-streaming pipeline.

The pipeline materialises a block, then for each group of linears that `groups` returns, runs
the calibration windows through the block with `add_batch` hooked to those linears, and calls
`prune` on the group. After the last group it runs the windows again to get the block's
outputs, which feed the next block. Nothing in the pipeline depends on the method.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..masks import prune_mask


class PruningMethod:
    #: False when the method scores weights alone and needs no calibration forward pass.
    needs_calibration: bool = True

    def __init__(self, config: PruneConfig):
        self.config = config

    def groups(self, linears: dict[str, nn.Linear]) -> list[list[str]]:
        """Linears to collect statistics for and prune together, in order; one group by default."""
        return [list(linears)]

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Statistics from one micro-batch of the inputs (and outputs) of linear `name`."""

    def prune(self, linears: dict[str, nn.Linear]) -> dict[str, dict]:
        """Prune these linears in place; return anything worth reporting per module."""
        raise NotImplementedError


class ScoreMaskMethod(PruningMethod):
    """Methods that zero the weights with the lowest importance score, leaving the rest untouched."""

    per_row = False

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prune(self, linears: dict[str, nn.Linear]) -> dict[str, dict]:
        for name, linear in linears.items():
            scores = self.score(name, linear.weight.float())
            mask = prune_mask(scores, self.config.sparsity_ratio, self.config.nm, self.per_row)
            linear.weight[mask] = 0
        return {name: {} for name in linears}
