"""Turning importance scores into pruning masks (True = prune), with exact counts.

Ties are broken by position (earlier index pruned first), so the result does not depend on
how a sort or selection routine happens to order equal scores: quantized checkpoints have many.
"""
from __future__ import annotations

import torch

from .config import OffloadPruneError


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Along the last dim, mark exactly the k lowest scores."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=-1) <= still_needed))


def prune_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
               per_row: bool) -> torch.Tensor:
    """Mask for a [out, in] score matrix.

    N:M prunes the N lowest of every M consecutive inputs of each row. Unstructured prunes
    int(sparsity * width) per row when `per_row` (Wanda's comparison group), else
    int(sparsity * numel) over the whole matrix (one threshold, as magnitude pruning).
    """
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise OffloadPruneError(f"{n}:{m} sparsity needs the input width ({cols}) to be a multiple of {m}")
        return lowest_k(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)
    if per_row:
        return lowest_k(scores, int(cols * sparsity))
    return lowest_k(scores.reshape(1, -1), int(scores.numel() * sparsity)).reshape(rows, cols)


def nm_valid(weight: torch.Tensor, nm: tuple[int, int]) -> bool:
    """Every group of M consecutive inputs holds at least N zeros."""
    n, m = nm
    if weight.shape[-1] % m:
        return False
    # int8 sums: a third of the time of the default int64 reduction on CPU
    nonzeros = (weight.reshape(-1, m) != 0).to(torch.int8).sum(dim=-1, dtype=torch.int8)
    return bool((nonzeros <= m - n).all())
