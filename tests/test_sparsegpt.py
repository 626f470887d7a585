"""SparseGPT against textbook OBS, and its shared-Hessian, dead-column and damping-retry paths."""
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from offload_prune.config import PruneConfig
from offload_prune.methods.sparsegpt import SparseGPT, inverse_cholesky, prune_with_obs
from offload_prune.model.matrices import describe, find_matrices
from offload_prune.stream.pipeline import prune

from conftest import read_all_tensors


def textbook_obs(weight, hessian, sparsity, nm, blocksize, percdamp):
    """Optimal Brain Surgeon, one column at a time in float64, with the explicit inverse of the
    remaining columns' Hessian updated by Gaussian elimination after each step. The mask is chosen
    per block of columns (per M-group for N:M) from the saliency w^2 / [H_F^-1]_jj, as SparseGPT does."""
    w, h = weight.double().clone(), hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    rows, cols = w.shape
    inverses, inverse = [], torch.linalg.inv(h)
    for _ in range(cols):
        inverses.append(inverse)
        inverse = inverse[1:, 1:] - torch.outer(inverse[1:, 0], inverse[0, 1:]) / inverse[0, 0]
    diag = torch.tensor([inv[0, 0] for inv in inverses], dtype=h.dtype)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            block = slice(j, min(j + blocksize, cols))
            saliency = (w[:, block] ** 2 / diag[block]).flatten()
            chosen = torch.argsort(saliency)[: int(saliency.numel() * sparsity)]
            mask[:, block] = torch.zeros_like(saliency, dtype=torch.bool).index_fill_(0, chosen, True).reshape(rows, -1)
        if nm is not None and j % nm[1] == 0:
            group = slice(j, j + nm[1])
            order = torch.argsort(w[:, group] ** 2 / diag[group], dim=1)[:, : nm[0]]
            mask[:, group] = torch.zeros(rows, nm[1], dtype=torch.bool).scatter_(1, order, True)
        pruned = torch.where(mask[:, j], 0.0, w[:, j])
        w[:, j:] -= ((w[:, j] - pruned) / inverses[j][0, 0])[:, None] * inverses[j][0][None, :]
        w[:, j] = pruned
    return w, mask


def calibration(tokens=256, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g) * 3  # uneven feature scales
    return x, 2 / 4 * x.T @ x  # as if from 4 sequences


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_matches_textbook_obs(nm, blocksize):
    x, hessian = calibration()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    hessian[5, :] = hessian[:, 5] = 0  # a dead input feature
    expected, expected_mask = textbook_obs(weight, hessian, 0.5, nm, blocksize, 0.01)
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    upper, _, retries = inverse_cholesky(h, 0.01)
    pruned, _ = prune_with_obs(weight, upper, dead, 0.5, nm, blocksize)
    assert retries == 0
    assert torch.equal(pruned == 0, expected_mask | dead[None, :].expand_as(expected_mask))
    torch.testing.assert_close(pruned.double(), expected, rtol=1e-4, atol=1e-4)
    assert int((pruned == 0).sum()) >= pruned.numel() // 2
    if nm:
        assert bool(((pruned == 0).reshape(-1, nm[1]).sum(1) >= nm[0]).all())


def make_method(share=True, **options):
    return SparseGPT(PruneConfig(model="-", prune_method="sparsegpt", **options).validate(), share_hessians=share)


def feed(method, layers, inputs):
    """Hook the layers as the pipeline does and run inputs through them."""
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: method.add_batch(n, a[0], out)) for n, m in layers.items()]
    for batch in inputs:
        for module in layers.values():
            module(batch)
    for h in hooks:
        h.remove()


def test_reconstruction_error_equals_direct_computation():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=True)
    inputs = [torch.randn(1, 40, 64) * torch.rand(64) for _ in range(4)]
    method = make_method()
    feed(method, {"fc": layer}, inputs)
    dense = layer.weight.detach().clone()
    info = method.prune({"fc": layer}, 0.5)["fc"]
    x = torch.cat(inputs).reshape(-1, 64)
    direct = ((x @ (dense - layer.weight.detach()).T) ** 2).sum() / ((x @ dense.T) ** 2).sum()
    assert info["reconstruction_error"] == pytest.approx(float(direct), rel=1e-3)
    assert 0 < info["reconstruction_error"] < 1


def attention_like_linears(seed=0):
    torch.manual_seed(seed)
    return {"self_attn.q_proj": nn.Linear(32, 32, bias=False), "self_attn.k_proj": nn.Linear(32, 16, bias=False),
            "self_attn.v_proj": nn.Linear(32, 16, bias=False)}


def test_shared_hessian_equals_per_linear():
    inputs = [torch.randn(1, 24, 32) for _ in range(3)]
    results = []
    for share in (True, False):
        layers = attention_like_linears()
        method = make_method(share)
        feed(method, layers, inputs)
        assert len(method.hessians) == (1 if share else 3)
        method.prune(layers, 0.5)
        results.append({n: m.weight.detach().clone() for n, m in layers.items()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def correctly_rounded(value: Fraction) -> float:
    """The float32 nearest an exact rational (ties to even), computed with exact arithmetic."""
    guess = torch.tensor(float(value), dtype=torch.float32)
    neighbours = [torch.nextafter(guess, torch.tensor(direction)) for direction in (-math.inf, math.inf)]
    candidates = sorted((abs(Fraction(float(c)) - value), int(c.view(torch.int32)) & 1, float(c))
                        for c in [guess, *neighbours])
    return candidates[0][2]


def test_float64_hessians_are_the_exact_sum_rounded_however_the_tokens_were_grouped():
    """A float64 Hessian, rounded to float32 for the solve, is the exact sum of the tokens' x x^T
    correctly rounded (the reference: rational arithmetic), for one micro-batch of 6 windows, 6
    micro-batches of one, and two ranks' halves combined."""
    torch.manual_seed(0)
    windows = torch.randn(6, 10, 8) * torch.rand(8) * 3
    outputs = torch.zeros(1, 10, 4)

    def summed(*micro_batches):
        method = make_method(hessian_dtype="float64")
        for batch in micro_batches:
            method.add_batch("fc", batch, outputs)
        return method.hessians["fc"]

    class TwoRanks:  # what Ranks.gather_tensors returns on two ranks, the other rank's sum given
        world = 2

        def __init__(self, other):
            self.other = other

        def gather_tensors(self, tensor):
            theirs = self.other.hi if tensor.dtype == torch.float64 else self.other.lo
            return [tensor.clone(), theirs[:tensor.shape[0]].clone()]

    first, second = summed(windows[:2]), summed(windows[2:])
    first.reduce(TwoRanks(second))
    groupings = [summed(windows).rounded(), summed(*windows.split(1)).rounded(), first.rounded()]
    x = [[Fraction(float(v)) for v in token] for token in windows.reshape(-1, 8).tolist()]
    exact = torch.tensor([[correctly_rounded(sum(t[i] * t[j] for t in x)) for j in range(8)] for i in range(8)])
    for rounded in groupings:
        assert rounded.dtype == torch.float32 and torch.equal(rounded, exact)


def test_compensated_sum_rounds_what_a_plain_float64_sum_loses():
    """(1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies half a float32 step above 1 + 2^-11; with 2^-60 more the
    exact sum rounds up. A float64 sum drops the 2^-60 and rounds the tie down (to even)."""
    tokens = torch.tensor([[[1 + 2 ** -12, 1.0]], [[2 ** -30, 2 ** -30]]])
    plain = (tokens.double().reshape(-1, 2).T @ tokens.double().reshape(-1, 2)).float()
    method = make_method(hessian_dtype="float64")
    method.add_batch("fc", tokens, torch.zeros(1, 1, 1))
    rounded = method.hessians["fc"].rounded()
    assert float(plain[0, 0]) == 1 + 2 ** -11
    assert float(rounded[0, 0]) == 1 + 2 ** -11 + 2 ** -23
    assert float(rounded[0, 1]) == float(plain[0, 1]) == 1 + 2 ** -12  # 2^-60 is far below half a step here


@pytest.mark.parametrize("size", [5, 128, 300])
def test_float32_hessian_summed_below_the_diagonal_is_the_whole_symmetric_sum(size):
    """The float32 sum computes only each row block's columns up to its diagonal block; rounded, it is the
    whole x^T x: symmetric, and within float32 rounding of the float64 product (sizes below, at and over
    one block, windows added in two micro-batches)."""
    torch.manual_seed(0)
    windows = torch.randn(3, 40, size)
    method = make_method()
    for batch in (windows[:2], windows[2:]):
        method.add_batch("fc", batch, torch.zeros(1))
    hessian = method.hessians["fc"].rounded()
    x = windows.reshape(-1, size).double()
    bound = 1e-5 * (x.abs().T @ x.abs())
    assert hessian.dtype == torch.float32 and torch.equal(hessian, hessian.T)
    assert ((hessian.double() - x.T @ x).abs() <= bound).all()


def test_rank_deficient_input_is_retried_with_more_damping():
    layer = nn.Linear(64, 16, bias=False)
    low_rank = torch.randn(1, 8, 4) @ torch.randn(4, 64)  # rank 4 < 64 columns
    method = make_method(percdamp=0.0)
    feed(method, {"fc": layer}, [low_rank])
    info = method.prune({"fc": layer}, 0.5)["fc"]
    assert info["cholesky_retries"] > 0 and info["damping"] > 0
    assert torch.isfinite(layer.weight).all()
    assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2


def test_true_sequential_groups_and_pipeline_run(tiny_llama, tmp_path):
    method = make_method(true_sequential=True)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    block = LlamaDecoderLayer(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                          num_key_value_heads=2), 0)
    matrices = find_matrices(block)
    describe(block, matrices)
    assert method.groups(matrices) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    reports = {}
    for sequential in (False, True):
        save = tmp_path / f"seq{sequential}"
        reports[sequential] = prune(PruneConfig(
            model=str(tiny_llama), save=save, prune_method="sparsegpt", sparsity_type="2:4",
            calib_data=str(tiny_llama / "demo.txt"), nsamples=4, seqlen=32, true_sequential=sequential, quiet=True))
        assert reports[sequential]["nm_valid"] and reports[sequential]["totals"]["all"]["sparsity"] == 0.5
        errors = [m["reconstruction_error"] for m in reports[sequential]["modules"].values()]
        assert all(0 < e < 1 for e in errors)
    a, b = read_all_tensors(tmp_path / "seqFalse"), read_all_tensors(tmp_path / "seqTrue")
    assert torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.layers.0.self_attn.o_proj.weight"], b["model.layers.0.self_attn.o_proj.weight"])


def test_failed_second_factorisation_rebuilds_h_and_retries(monkeypatch):
    """If chol(H^-1) fails after chol(H) succeeded, H is rebuilt from the inverse and damped 10x more."""
    _, hessian = calibration()
    expected, damping, _ = inverse_cholesky(hessian.clone(), 0.1)  # what the retry should land on
    real = torch.linalg.cholesky_ex
    failures = [1]

    def flaky(matrix, upper=False, **kw):
        if upper and failures:
            failures.pop()
            return real(matrix, upper=upper, **kw)[0], torch.tensor(1)
        return real(matrix, upper=upper, **kw)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    upper, used, retries = inverse_cholesky(hessian.clone(), 0.01)
    assert retries == 1 and used == pytest.approx(damping)
    torch.testing.assert_close(upper, expected, rtol=1e-3, atol=1e-4)


def test_unstructured_sparsity_is_exact_in_every_module(tiny_llama, tmp_path):
    report = prune(PruneConfig(model=str(tiny_llama), save=tmp_path / "out", prune_method="sparsegpt",
                               sparsity_ratio=0.5, calib_data=str(tiny_llama / "demo.txt"), nsamples=4, seqlen=32,
                               blocksize=32, quiet=True))
    for name, module in report["modules"].items():
        assert module["zeros"] == module["numel"] // 2, name
        assert module["cholesky_retries"] == 0 and module["seconds"] >= 0
        assert type(module["reconstruction_error"]) is float  # a number in report.json, not a tensor's text


def test_tf32_guard_uses_the_current_api():
    """A process that set TF32 through torch's fp32_precision API: the guard neither raises (reading
    the legacy flags would) nor leaves its own setting behind."""
    from offload_prune.runtime.hessian_sums import no_tf32
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without fp32_precision")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with no_tf32():
            assert matmul.fp32_precision == "ieee" and torch.backends.cudnn.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
