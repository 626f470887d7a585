import resource

import pytest
import torch

import offload_prune.runtime.masks as masks
from offload_prune.config import OffloadPruneError
from offload_prune.runtime.hostmem import keep_large_allocations_mmapped
from offload_prune.runtime.masks import lowest_k, nm_valid, zero_lowest

from reference import argsort_mask


def mask_of(scores, sparsity, nm, per_row):
    """What zero_lowest prunes, as a mask (the weight is all ones)."""
    weight = torch.ones_like(scores)
    zero_lowest(weight, lambda rows: scores[rows].clone(), sparsity, nm, per_row)
    return weight == 0


def test_lowest_k_breaks_ties_by_position():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.5, 2.0]])
    assert lowest_k(scores, 2).tolist() == [[False, True, True, False, False]]
    assert lowest_k(scores, 0).sum() == 0
    assert lowest_k(scores, 5).all()


@pytest.mark.parametrize("chunk", [masks.CHUNK_ELEMENTS, 100])  # one chunk; many (ties across chunk borders)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("quantized", [False, True])
def test_masks_equal_a_sort_based_reference(per_row, nm, quantized, chunk, monkeypatch):
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    scores = torch.randn(48, 64).abs()
    if quantized:  # heavy ties, as in GGUF-dequantized checkpoints
        scores = (scores * 4).round()
    for sparsity in (0.0, 0.3, 0.5, 0.7, 0.999):
        mask = mask_of(scores, sparsity, nm, per_row)
        assert torch.equal(mask, argsort_mask(scores, sparsity, nm, per_row))
        expected = scores.numel() * nm[0] // nm[1] if nm else (
            48 * int(64 * sparsity) if per_row else int(scores.numel() * sparsity))
        assert int(mask.sum()) == expected


def test_one_threshold_over_the_whole_range_of_floats(monkeypatch):
    """Scores from 1e-30 to 1e30 and exact zeros: the radix select's two histogram levels."""
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", 64)
    torch.manual_seed(1)
    scores = 10 ** (torch.rand(40, 32) * 60 - 30)
    scores[::7, ::3] = 0
    scores[5, 5] = -0.0
    for sparsity in (0.1, 0.33, 0.5, 0.9):
        assert torch.equal(mask_of(scores, sparsity, None, False), argsort_mask(scores, sparsity, None, False))


def test_nm_validity_and_width_check():
    weight = torch.randn(8, 16)
    zero_lowest(weight, lambda rows: weight[rows].abs(), 0.5, (2, 4), True)
    assert nm_valid(weight, (2, 4)) and not nm_valid(weight, (3, 4))
    with pytest.raises(OffloadPruneError, match="multiple of 4"):
        zero_lowest(torch.rand(4, 10), lambda rows: torch.rand(4, 10)[rows], 0.5, (2, 4), True)


def test_cpu_selection_reuses_heap_memory_instead_of_faulting_in_new_pages():
    """With large allocations kept mmapped (hostmem), every temporary of 1 MiB or more is a fresh mapping
    whose pages fault in again; the CPU chunks keep the selection's temporaries below that, so selecting
    in a 16 MiB score matrix faults in far fewer pages than the matrix has (4M-score chunks: ~30,000)."""
    keep_large_allocations_mmapped()
    torch.manual_seed(0)
    weight = torch.randn(2048, 2048)
    norms = torch.rand(2048)

    def score(rows: slice) -> torch.Tensor:
        return weight[rows].abs().mul_(norms)
    zero_lowest(weight.clone(), score, 0.5, None, True)  # warm: the heap grows to one chunk's workspace
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    zero_lowest(weight, score, 0.5, None, True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert int((weight == 0).sum()) == 2048 * 1024
    assert faults < weight.nbytes // 4096 // 8, faults
