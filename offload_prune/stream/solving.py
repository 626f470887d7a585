"""One group of a method's matrices pruned once its statistics are collected: by the method, across
torchrun ranks when there are several, or by magnitude where (almost) no calibration token reached a
matrix. Shared by whole blocks (blocks.py) and blocks streamed expert group by expert group
(expert_blocks.py)."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..methods import PruningMethod
from ..model.matrices import Matrix
from ..runtime.masks import zero_lowest
from .passes import Run


def prune_members(run: Run, members: dict[str, Matrix], tokens: dict[str, int], sparsity: float) -> dict[str, dict]:
    """Prune these matrices, whose statistics the method holds (`tokens`: calibration tokens each saw);
    returns what to report per matrix."""
    method, config = run.method, run.config
    if run.ranks.world > 1 and method.needs_calibration:
        tokens = run.ranks.sum_counts(tokens, list(members))
        method.reduce_statistics(run.ranks, members)
    method_info: dict[str, dict] = {}
    starved = _starved(members, tokens, config) if method.needs_calibration else {}
    if starved:
        method_info.update(_prune_by_magnitude(method, starved, tokens, config, sparsity))
    rest = {n: m for n, m in members.items() if n not in starved}
    if rest:
        method_info.update(_solve(run, rest, sparsity))
    for name in members:  # what each expert was pruned from
        if members[name].expert is not None and tokens:
            method_info.setdefault(name, {})["routed_tokens"] = tokens.get(name, 0)
    return method_info


def _solve(run: Run, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
    """The method's prune. Across ranks each rank solves the units dealt to it, forgetting the others'
    statistics, and every pruned matrix is then broadcast from the rank that solved it."""
    method, ranks = run.method, run.ranks
    if ranks.world == 1:
        return method.prune(linears, sparsity)
    units = method.solve_units(list(linears))
    owners = ranks.deal(units, lambda name: linears[name].weight.numel() * linears[name].in_features)
    mine = {name: linears[name] for unit, owner in zip(units, owners) if owner == ranks.rank for name in unit}
    method.discard([name for name in linears if name not in mine])
    info = method.prune(mine, sparsity) if mine else {}
    for unit, owner in zip(units, owners):
        for name in unit:
            ranks.share(linears[name].weight, owner)
            if linears[name].bias is not None:  # ria's permutation reorders biases
                ranks.share(linears[name].bias, owner)
    return {name: item for part in ranks.gather(info) for name, item in part.items()}


def _starved(members: dict[str, Matrix], tokens: dict[str, int], config: PruneConfig) -> dict[str, Matrix]:
    """Experts routed fewer than --expert-min-tokens calibration tokens, and any matrix the block's
    forward never fed (Mamba's dt_proj is read as a weight, not called)."""
    return {n: m for n, m in members.items()
            if tokens.get(n, 0) < (config.expert_min_tokens if m.expert is not None else 1)}


@torch.no_grad()
def _prune_by_magnitude(method: PruningMethod, starved: dict[str, Matrix], tokens: dict[str, int],
                        config: PruneConfig, sparsity: float) -> dict[str, dict]:
    """Matrices with (almost) no calibration statistics: pruned by magnitude instead (one threshold per
    matrix, as --prune_method magnitude)."""
    method.discard(list(starved))
    for matrix in starved.values():
        zero_lowest(matrix.weight, lambda rows, w=matrix.weight: w[rows].float().abs(), sparsity, config.nm,
                    per_row=False)
    return {n: {"rule": "magnitude", "calibration_tokens": tokens.get(n, 0),
                "fallback": "few routed tokens" if m.expert is not None else "never fed"} for n, m in starved.items()}
