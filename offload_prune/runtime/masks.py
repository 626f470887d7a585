"""Zeroing the weights with the lowest importance scores, with exact counts and bounded memory.

Ties are broken by position (earlier index pruned first), so the result does not depend on
how a sort or selection routine happens to order equal scores: quantized checkpoints have many.

Scores are computed and applied a chunk of rows at a time, so no temporary is the size of the matrix:
that matters for a 128k-vocabulary head or a 28672-wide MLP. On the CPU the chunks are smaller still,
so that every temporary of a chunk comes from the heap (see HOST_CHUNK_ELEMENTS).
One threshold over a whole matrix is found exactly without sorting it: for non-negative float32
scores the bit pattern, read as an int32, orders like the value, so two 16-bit histogram passes
locate the k-th smallest key (a radix select), and a third pass zeroes what lies below it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import OffloadPruneError
from .hostmem import MMAP_THRESHOLD_BYTES

#: Scores per chunk on an accelerator. Workspace per chunk is about WORKSPACE_BYTES_PER_SCORE times this.
CHUNK_ELEMENTS = 1 << 22
#: Scores per chunk on the CPU: the largest temporary of a chunk (kthvalue's int64 positions, 8 bytes a
#: score) stays below the mmap threshold, so the chunk's temporaries come from the heap and are reused
#: chunk after chunk. At 4M scores each was a fresh mapping whose pages faulted in again: the mask
#: selection of a Llama block took 1.8x as long on a 2-core CPU (bench/mask_chunks.py), a streamed Wanda
#: run ~25 % longer.
HOST_CHUNK_ELEMENTS = MMAP_THRESHOLD_BYTES // 16
#: float32 scores, one float32 temporary, int64 bincount / cumsum input, bool masks.
WORKSPACE_BYTES_PER_SCORE = 4 + 4 + 8 + 2

ScoreRows = Callable[[slice], torch.Tensor]


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Along the last dim, mark exactly the k lowest scores."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.dim() == 1:
        return lowest_k(scores[None], k)[0]
    threshold = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    still_needed = k - below.sum(dim=-1, keepdim=True)
    mask = below | tied
    # Only rows with more scores tied at the threshold than still needed take the first ones by position;
    # a running count over every row cost a quarter of a Wanda run's time.
    surplus = (tied.sum(dim=-1, keepdim=True) > still_needed).squeeze(-1)
    if surplus.any():
        tied_rows = tied[surplus]
        mask[surplus] = below[surplus] | (tied_rows & (tied_rows.cumsum(dim=-1) <= still_needed[surplus]))
    return mask


def chunk_elements(device_type: str) -> int:
    return min(CHUNK_ELEMENTS, HOST_CHUNK_ELEMENTS) if device_type == "cpu" else CHUNK_ELEMENTS


def row_chunks(rows: int, cols: int, elements: int) -> list[slice]:
    """Slices of rows holding about `elements` entries (at least one row each)."""
    step = max(1, elements // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def chunks_of(weight: torch.Tensor) -> list[slice]:
    """Row slices of a [out, in] matrix the size of a chunk on its device."""
    return row_chunks(*weight.shape, chunk_elements(weight.device.type))


def chunk_workspace_bytes(numel: int, device_type: str) -> int:
    """Bytes the mask step allocates beyond the weight itself, for a matrix of `numel` weights whose
    scores are made on `device_type`."""
    return min(numel, chunk_elements(device_type)) * WORKSPACE_BYTES_PER_SCORE


@torch.no_grad()
def zero_lowest(weight: torch.Tensor, score_rows: ScoreRows, sparsity: float, nm: tuple[int, int] | None,
                per_row: bool, scores_on: torch.device | None = None) -> None:
    """Zero, in place, the lowest-scored weights of a [out, in] matrix; `score_rows(rows)` gives the
    float32 scores of a slice of rows (computed on demand, on `scores_on` when not the weight's device).

    N:M zeroes the N lowest of every M consecutive inputs of each row. Unstructured zeroes
    int(sparsity * width) per row when `per_row` (Wanda's comparison group), else
    int(sparsity * numel) over the whole matrix (one threshold, as magnitude pruning)."""
    rows, cols = weight.shape
    chunks = row_chunks(rows, cols, chunk_elements((scores_on or weight.device).type))
    if nm is not None and cols % nm[1]:
        raise OffloadPruneError(f"{nm[0]}:{nm[1]} sparsity needs the input width ({cols}) to be a multiple of {nm[1]}")
    if nm is not None or per_row:
        for chunk in chunks:
            scores = score_rows(chunk)
            if nm is not None:
                n, m = nm
                mask = lowest_k(scores.reshape(-1, cols // m, m), n).reshape(scores.shape)
            else:
                mask = lowest_k(scores, int(cols * sparsity))
            weight[chunk].masked_fill_(mask.to(weight.device), 0)
        return
    k = int(weight.numel() * sparsity)
    if k <= 0:
        return
    threshold, ties = _kth_smallest_key(score_rows, chunks, k)
    for chunk in chunks:
        keys = _keys(score_rows(chunk))
        mask = keys < threshold
        if ties > 0:
            tied = keys == threshold
            tied_count = int(tied.sum())
            if tied_count:
                take = tied.flatten().cumsum(0).reshape(tied.shape) <= ties
                mask |= tied & take
                ties -= min(tied_count, ties)
        weight[chunk].masked_fill_(mask.to(weight.device), 0)


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the (non-negative) float32 scores; a negative zero counts as zero."""
    return scores.float().view(torch.int32).clamp_(min=0)


def _kth_smallest_key(score_rows: ScoreRows, chunks: list[slice], k: int) -> tuple[int, int]:
    """(key of the k-th smallest score, how many scores equal to it are among the k smallest)."""
    high = torch.zeros(1 << 15, dtype=torch.int64)  # keys are < 2^31: 15 high bits
    for chunk in chunks:
        high += torch.bincount((_keys(score_rows(chunk)) >> 16).flatten(), minlength=1 << 15).cpu()
    bucket, before = _bucket_of(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks:
        keys = _keys(score_rows(chunk))
        low += torch.bincount((keys[(keys >> 16) == bucket] & 0xFFFF).flatten(), minlength=1 << 16).cpu()
    offset, before_in_bucket = _bucket_of(low, k - before)
    return (bucket << 16) | offset, k - before - before_in_bucket


def _bucket_of(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th smallest item, and how many items lie in the buckets before it."""
    cumulative = histogram.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor([k]), right=False)[0])
    return bucket, int(cumulative[bucket - 1]) if bucket > 0 else 0


def nm_valid(weight: torch.Tensor, nm: tuple[int, int]) -> bool:
    """Every group of M consecutive inputs holds at least N zeros."""
    return weight.shape[-1] % nm[1] == 0 and bool(nm_holds(weight, nm))


def nm_holds(weight: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """nm_valid as a 0-dim bool tensor on the weight's device (no host sync), for an input width that is a
    multiple of M."""
    n, m = nm
    # int8 sums: a third of the time of the default int64 reduction on CPU
    nonzeros = (weight.reshape(-1, m) != 0).to(torch.int8).sum(dim=-1, dtype=torch.int8)
    return (nonzeros <= m - n).all()
