"""OWL's dense pass: each block's outlier ratio measured on its dense inputs, then the per-block sparsities.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.matrices import find_matrices, observe
from ..model.selection import selected_matrices
from ..model.skeleton import run_windows
from ..surgery.layer_sparsity import OutlierCounter, owl_ratios
from .passes import Run, dense_pass


def _start_outliers(run: Run, index: int, block: nn.Module, layer_kwargs: dict, inputs: torch.Tensor):
    matrices = find_matrices(block)
    run.described.describe(block, matrices, lambda: run_windows(block, layer_kwargs, inputs[:1], None, 1, run.device))
    chosen = selected_matrices(matrices, index, run.streamed.num_layers, run.config)
    counter = OutlierCounter()

    def result() -> tuple[dict, dict]:
        run.ranks.sum_named(counter.sum_squares, list(chosen), lambda name: torch.zeros(
            chosen[name].in_features, dtype=torch.float64, device=chosen[name].weight.device))
        ratio, weights = counter.outlier_ratio(chosen, run.config.owl_m)
        return {"outlier_ratio": ratio, "weights": weights}, {}

    return observe(chosen, counter.add_batch, weight_by_router=True), result


def measure_outliers(run: Run) -> None:
    """OWL's dense pass: each block's outlier ratio with its dense inputs; then the per-block
    sparsities, and the calibration capture is redone for the pruning pass (the dense activations
    are not its inputs)."""
    config, state, streamed = run.config, run.state, run.streamed
    measured = dense_pass(run, "outliers", "owl: outliers (dense)", _start_outliers)
    pruned = [i for i, m in enumerate(measured) if m["weights"]]
    ratios = owl_ratios([measured[i]["outlier_ratio"] for i in pruned], [measured[i]["weights"] for i in pruned],
                        config.sparsity_ratio, config.owl_lambda)
    sparsities = [config.sparsity_ratio] * streamed.num_layers
    for i, ratio in zip(pruned, ratios):
        sparsities[i] = ratio
    run.store.release()
    state.commit(run_files={}, layer_sparsity=sparsities, captured=False)
