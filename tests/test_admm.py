"""ADMM weight update against a float64 textbook solution of the same masked least-squares problem."""
import pytest
import torch
from torch import nn

from offload_prune.config import PruneConfig
from offload_prune.methods.admm import ADMM, DAMPING, admm_prune, schedule
from offload_prune.methods.sparsegpt import SparseGPT

from test_sparsegpt import feed


def correlated_inputs(tokens=400, cols=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) * 0.3 + torch.eye(cols, dtype=dtype)
    scales = torch.rand(cols, generator=g, dtype=dtype) * 3 + 0.1
    return (torch.randn(tokens, cols, generator=g, dtype=dtype) @ mix) * scales


def textbook(weight, hessian, mask):
    """Per row, the kept weights minimising (w - w') H_d (w - w')^T with H_d = H + delta Diag(H):
    H_d[S, S] w'_S = (H_d w)_S, solved directly."""
    damped = hessian + DAMPING * torch.diag(torch.diag(hessian))
    out = torch.zeros_like(weight)
    for i, row in enumerate(weight):
        keep = ~mask[i]
        out[i, keep] = torch.linalg.solve(damped[keep][:, keep], (damped @ row)[keep])
    return out


def output_error(weight, pruned, hessian):
    change = weight - pruned
    return float(((change @ (hessian + DAMPING * torch.diag(torch.diag(hessian)))) * change).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_converges_to_the_textbook_masked_least_squares(nm):
    x = correlated_inputs()
    hessian = 2 / len(x) * x.T @ x
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pruned, mask = admm_prune(weight, hessian, 0.5, nm, iterations=600, rho=1.0)
    expected = textbook(weight, hessian, mask)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-8 * float(expected.abs().max()))
    assert torch.equal(pruned == 0, mask)
    assert bool((mask.sum(dim=1) == 16).all())  # exactly half of every row
    if nm:
        assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())
    # The paper's 20 iterations: within 1 % of the optimum for the mask they chose.
    quick, quick_mask = admm_prune(weight, hessian, 0.5, nm, iterations=20, rho=1.0)
    optimum = output_error(weight, textbook(weight, hessian, quick_mask), hessian)
    assert optimum <= output_error(weight, quick, hessian) <= 1.01 * optimum


def test_gradual_schedule_reaches_the_target_and_is_cubic():
    values = [schedule(t, 15) for t in range(20)]
    assert values[14:] == [1.0] * 6 and all(a < b for a, b in zip(values[:14], values[1:15]))
    assert values[0] == pytest.approx(1 - (14 / 15) ** 3)


def prune_layer(method_class, method, x, **options):
    layer = nn.Linear(x.shape[1], 24, bias=True)
    torch.manual_seed(3)
    nn.init.normal_(layer.weight)
    dense = layer.weight.detach().clone()
    pruner = method_class(PruneConfig(model="-", prune_method=method, **options).validate())
    feed(pruner, {"fc": layer}, [x[None]])
    info = pruner.prune({"fc": layer}, 0.5)["fc"]
    xb = x.float()
    direct = float(((xb @ (dense - layer.weight.detach()).T) ** 2).sum() / ((xb @ dense.T) ** 2).sum())
    return layer.weight.detach(), info, direct


def test_method_reports_its_error_and_beats_sparsegpt():
    x = correlated_inputs(tokens=300, cols=64, dtype=torch.float32)
    weight, info, direct = prune_layer(ADMM, "admm", x)
    assert bool(((weight == 0).sum(dim=1) == 32).all())
    assert info["reconstruction_error"] == pytest.approx(direct, rel=1e-3)
    _, sparsegpt_info, sparsegpt_direct = prune_layer(SparseGPT, "sparsegpt", x)
    assert direct < sparsegpt_direct
