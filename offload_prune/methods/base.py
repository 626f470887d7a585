"""What every pruning method provides to the block-streaming pipeline.

The pipeline materialises a block, then for each group of linears that `groups` returns, runs
the calibration windows through the block with `add_batch` hooked to those linears, and calls
`prune` on the group. After the last group it runs the windows again to get the block's
outputs, which feed the next block. Nothing in the pipeline depends on the method.
"""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..model.matrices import Matrix
from ..runtime.distributed import Ranks
from ..runtime.masks import ScoreRows, chunk_workspace_bytes, zero_lowest
from ..surgery.neurons import InputMoments, MlpUnit


class PruningMethod:
    #: False when the method scores weights alone and needs no calibration forward pass.
    needs_calibration: bool = True
    #: Calibration passes per group before `prune`; `start_pass(i)` is called before each.
    calibration_passes: int = 1
    #: PruneConfig fields, beyond the ones every method shares, that change this method's result.
    options: tuple[str, ...] = ()
    #: Whether an expert's inputs are scaled by the router weight of each token (see README, MoE).
    weights_by_router: bool = True
    #: Whether add_batch reads the matrices' outputs; when not, a statistics pass stops each forward once
    #: the last matrix's input is seen (Wanda's pass skips down_proj and what follows it).
    reads_outputs: bool = True
    #: True when the method removes whole blocks instead of pruning weights (block_removal.py).
    removes_blocks: bool = False
    #: Structured pruning: whether a removed neuron's mean contribution goes into the output bias (FLAP).
    compensates_bias: bool = False
    #: Whether `reduce_statistics` is written: the method can run across torchrun ranks.
    runs_on_ranks: bool = False

    def __init__(self, config: PruneConfig):
        self.config = config

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        """Called first for each block with the matrices to prune (`Matrix`: an [out, in] weight view
        with its role). Returns the ones to collect statistics for and prune together, in order; one
        group by default."""
        return [list(linears)]

    def discard(self, names: list[str]) -> None:
        """Forget the statistics of these matrices: they are pruned another way."""

    def start_pass(self, index: int) -> None:
        """Called before calibration pass `index` of each group."""

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Statistics from one micro-batch of the inputs (and outputs) of linear `name`."""

    def reduce_statistics(self, ranks: Ranks, linears: dict[str, Matrix]) -> None:
        """Across ranks, after the calibration passes of a group: sum the statistics of these matrices
        over the ranks (`ranks.sum_`, `ranks.sum_named`), so that every rank holds what one process would
        have collected from all the windows. Collectives in the same order on every rank."""
        if self.needs_calibration:
            raise NotImplementedError(f"{type(self).__name__} does not run across ranks")

    def solve_units(self, names: list[str]) -> list[list[str]]:
        """Across ranks: the matrices whose `prune` must run together on one rank (sharing work, or
        changing each other); the units are dealt out among the ranks. One unit by default."""
        return [list(names)]

    def round_while_pruning(self, make_rounder) -> bool:
        """--quant-joint: a method whose prune sweeps the columns (SparseGPT) quantizes the kept weights in
        the same sweep, `make_rounder(name, matrix)` giving each matrix's column rounder; it then keeps
        each rounder in `self.rounded` (name: rounder). False: this method has no such sweep."""
        return False

    def rule(self, name: str) -> str:
        """What pruned module `name`, for the report."""
        return type(self).__name__.lower()

    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        """Prune these linears in place to `sparsity` (this block's ratio: --layer-sparsity may give each
        block its own; N:M ignores it); return anything worth reporting per module."""
        raise NotImplementedError

    def neuron_scores(self, unit: MlpUnit, moments: InputMoments | None) -> torch.Tensor:
        """Structured pruning: one importance per neuron of this MLP unit (higher is kept), from the
        weights, this method's statistics and the moments of the output matrix's input (None when no
        calibration ran)."""
        raise NotImplementedError(f"{type(self).__name__} has no neuron score")

    def memory_bytes(self, linears: dict[str, Matrix], compute_dtype: torch.dtype, device_type: str) -> dict[str, int]:
        """Compute-device bytes beyond the block's weights, for the memory plan: `statistics` held
        through the calibration pass, and the peak `prune` step (statistics still alive included), when
        computing in `compute_dtype` on `device_type`.
        `linears` may live on the meta device: only shapes are used. By default: the statistics,
        still held while the largest linear's scores and mask are made, a chunk of rows at a time."""
        statistics = self.statistics_bytes(linears)
        return {"statistics": statistics,
                "prune": statistics + max(chunk_workspace_bytes(m.weight.numel(), device_type)
                                          for m in linears.values())}

    def statistics_bytes(self, linears: dict[str, Matrix]) -> int:
        """Bytes of statistics held for these linears through a calibration pass."""
        return 0


class ScoreMaskMethod(PruningMethod):
    """Methods that zero the weights with the lowest importance score, leaving the rest untouched."""

    per_row = False

    def solve_units(self, names: list[str]) -> list[list[str]]:
        return [[name] for name in names]  # each matrix's mask depends on its own scores alone

    def scorer(self, name: str, weight: torch.Tensor) -> ScoreRows:
        """The float32 scores of any slice of rows of this linear's weight (called once per linear,
        after its statistics are complete)."""
        raise NotImplementedError

    @torch.no_grad()
    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        for name, linear in linears.items():
            zero_lowest(linear.weight, self.scorer(name, linear.weight), sparsity, self.config.nm, self.per_row)
        return {name: {} for name in linears}
