"""RIA's channel permutation: the block computes the same function, N:M keeps more score, and the
pruned model is N:M as stored."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from offload_prune.config import PruneConfig
from offload_prune.model.matrices import describe, find_matrices, observe
from offload_prune.methods.ria import RIA, deal_out, kept_score, neuron_row_order, ria_scores, column_sums

from conftest import read_all_tensors
from test_streaming_matches_in_memory import calibration_windows, run_streamed


def test_neuron_row_order_moves_each_neurons_rows_together():
    order = torch.tensor([2, 0, 1])
    assert neuron_row_order(order, 3, False).tolist() == [2, 0, 1]
    assert neuron_row_order(order, 6, False).tolist() == [2, 0, 1, 5, 3, 4]       # [gate..., up...]
    assert neuron_row_order(order, 6, True).tolist() == [4, 5, 0, 1, 2, 3]        # [g0, u0, g1, u1, ...]
    assert sorted(deal_out(torch.tensor([5.0, 1, 7, 3, 2, 8, 4, 6]), 4).tolist()) == list(range(8))


@torch.no_grad()
def test_permutation_keeps_the_function_and_gains_score():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64)).eval()
    matrices = find_matrices(mlp)
    x = torch.randn(3, 16, 32) * torch.rand(32) * 3
    describe(mlp, matrices, probe=lambda: mlp(x[:1]))
    method = RIA(PruneConfig(model="-", prune_method="ria", sparsity_type="2:4", ria_permute=True).validate())
    handles = observe(matrices, method.add_batch, True)
    before = mlp(x)
    for h in handles:
        h.remove()
    down = matrices["down_proj"]
    norms = method.sum_squares["down_proj"].sqrt().float()
    old = kept_score(ria_scores(down.weight, slice(None), column_sums(down.weight), norms, 0.5), (2, 4))
    gains = method._permute_neurons(matrices)
    assert torch.allclose(mlp(x), before, atol=1e-6)  # same function, neurons reordered
    norms = method.sum_squares["down_proj"].sqrt().float()
    new = kept_score(ria_scores(down.weight, slice(None), column_sums(down.weight), norms, 0.5), (2, 4))
    assert gains["down_proj"] == new / old > 1.0


def test_pruned_model_is_nm_as_stored_and_runs(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(arch="llama", num_layers=2, hidden=64, intermediate=128)
    report = run_streamed(folder, tmp_path / "out", "ria", "2:4", ria_permute=True)
    assert report["nm_valid"] is True
    gains = [m["permutation_gain"] for n, m in report["modules"].items() if n.endswith("down_proj")]
    assert len(gains) == 2 and all(g >= 1.0 for g in gains)
    written = read_all_tensors(tmp_path / "out")
    assert all(bool(((w == 0).reshape(-1, 4).sum(1) >= 2).all()) for n, w in written.items() if n.endswith("proj.weight"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(calibration_windows(folder)[:1]).logits).all()
