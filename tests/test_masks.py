import pytest
import torch

from offload_prune.config import OffloadPruneError
from offload_prune.masks import lowest_k, nm_valid, prune_mask

from reference import argsort_mask


def test_lowest_k_breaks_ties_by_position():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.5, 2.0]])
    assert lowest_k(scores, 2).tolist() == [[False, True, True, False, False]]
    assert lowest_k(scores, 0).sum() == 0
    assert lowest_k(scores, 5).all()


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("quantized", [False, True])
def test_masks_equal_a_sort_based_reference(per_row, nm, quantized):
    torch.manual_seed(0)
    scores = torch.randn(48, 64).abs()
    if quantized:  # heavy ties, as in GGUF-dequantized checkpoints
        scores = (scores * 4).round()
    for sparsity in (0.0, 0.3, 0.5, 0.7):
        mask = prune_mask(scores, sparsity, nm, per_row)
        assert torch.equal(mask, argsort_mask(scores, sparsity, nm, per_row))
        expected = scores.numel() * nm[0] // nm[1] if nm else (
            48 * int(64 * sparsity) if per_row else int(scores.numel() * sparsity))
        assert int(mask.sum()) == expected


def test_nm_validity_and_width_check():
    weight = torch.randn(8, 16)
    weight[prune_mask(weight.abs(), 0.5, (2, 4), True)] = 0
    assert nm_valid(weight, (2, 4)) and not nm_valid(weight, (3, 4))
    with pytest.raises(OffloadPruneError, match="multiple of 4"):
        prune_mask(torch.rand(4, 10), 0.5, (2, 4), True)
