"""GPTQ (Frantar et al. 2022) on a pruned weight: the columns are quantized one at a time and each one's
rounding error is spread over the columns not yet quantized, through the inverse layer Hessian, so the
layer's output moves as little as it can. Pruned weights stay exactly zero: their "quantized" value is 0,
and their error is spread like any other (the OBS update with the mask fixed, as in SparseGPT).

    H = (2/n) sum x x^T,   U = chol((H + lambda I)^-1)^T  (upper)
    for column j:  q_j = Q(w_j)  (0 where pruned),   e = (w_j - q_j) / U_jj,   w_{j+1:} -= e U_{j, j+1:}

Column blocks of `blocksize` are updated lazily (the rest of W once per block), as in the paper. A
group's scales are fixed when its first column is reached, from the group's current (already
corrected) kept weights; with activation order the columns go by decreasing H_jj and every group's
scales are fixed before the sweep, from the weights as pruned, so a group stays a run of stored columns
(compressed-tensors' "weight" activation order: no column index is stored).
"""
from __future__ import annotations

import torch

from ..methods.sparsegpt import inverse_cholesky
from .grid import ColumnRounder, Grid


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, scale_dtype: torch.dtype, percdamp: float,
         blocksize: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(quantized float32 weight, scale, zero point, damping retries) of a float32 [rows, columns]
    `weight` whose zeros are pruned weights, given its input's normalised Hessian (taken over: the
    factorisation frees it). Inputs that were always zero (H_jj = 0) get weight 0."""
    w = weight.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    w[:, dead] = 0
    kept = w != 0
    rows, columns = w.shape
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else None
    # Scales fixed before the sweep: with activation order, and for one group per row (it spans all blocks).
    static = act_order or grid.group_size == -1
    rounder = ColumnRounder(grid, rows, columns, scale_dtype, w.device,
                            static=grid.scales(w, kept, scale_dtype) if static else None, order=order)
    if act_order:
        w, kept = w[:, order], kept[:, order]
        hessian = hessian[order][:, order]
    upper, _, retries = inverse_cholesky(hessian, percdamp)
    del hessian
    # A block never splits a group: a group's scales are taken from columns the block has corrected.
    step = blocksize if static else max(blocksize // rounder.width, 1) * rounder.width
    for start in range(0, columns, step):
        end = min(start + step, columns)
        block, u = w[:, start:end].clone(), upper[start:end, start:end]
        errors = torch.zeros_like(block)
        for j in range(end - start):
            q = rounder(block, kept[:, start:end], j, start + j)
            error = (block[:, j] - q) / u[j, j]
            block[:, j] = q
            block[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ upper[start:end, end:]
    if act_order:
        w = w[:, torch.argsort(order)]
    # The grid's own function has the last word, so the weights kept are exactly those stored.
    return grid.fake_quantize(w, rounder.scale, rounder.zero), rounder.scale, rounder.zero, retries


def rtn(weight: torch.Tensor, grid: Grid, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: every weight to its group's grid, pruned ones staying zero."""
    scale, zero = grid.scales(weight, weight != 0, scale_dtype)
    return grid.fake_quantize(weight, scale, zero), scale, zero
