"""Whole MLP neurons (--sparsity_type structured): scores against a whole-model computation, the
least-squares refit against lstsq, FLAP's bias compensation, --shrink against zeroing on many
families (the smaller checkpoint loads and computes what the zeroed one does), and the refusals."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.config import OffloadPruneError, PruneConfig
from offload_prune.neurons import InputMoments, kept_width, refit_output
from offload_prune.pipeline import prune
from offload_prune.report import format_summary

from conftest import read_all_tensors, run_cli
from families import build_family
from reference import catch_layer0_inputs
from test_streaming_matches_in_memory import NSAMPLES, SEQLEN, calibration_windows


def run_structured(folder, save, method, **options):
    options = {"sparsity_ratio": 0.25, **options}
    return prune(PruneConfig(model=str(folder), save=save, prune_method=method, sparsity_type="structured",
                             calib_data=str(folder / "demo.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, quiet=True,
                             **options))


def test_kept_width_is_a_multiple_of_eight():
    assert kept_width(1536, 0.25) == 1152 and kept_width(128, 0.25) == 96 and kept_width(100, 0.5) == 48
    assert kept_width(128, 0.99) == 8 and kept_width(128, 0.0) == 128


@torch.no_grad()
def structured_in_memory(folder, windows, method, ratio):
    """Whole model, layer by layer: each MLP's neuron scores written out from the definitions, the
    lowest neurons zeroed (rows of gate/up, column of down), pruned outputs feeding the next layer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, (args, kwargs) = catch_layer0_inputs(model, windows)
    for layer in model.model.layers:
        mlp = layer.mlp
        seen = {"gate": [], "down": []}
        hooks = [mlp.gate_proj.register_forward_hook(lambda m, a, o: seen["gate"].append(a[0].reshape(-1, a[0].shape[-1]))),
                 mlp.down_proj.register_forward_hook(lambda m, a, o: seen["down"].append(a[0].reshape(-1, a[0].shape[-1])))]
        for x in inputs:
            layer(x, *args, **kwargs)
        for hook in hooks:
            hook.remove()
        x_in, x_down = torch.cat(seen["gate"]).double(), torch.cat(seen["down"]).double()
        gate, up, down = (w.weight.double() for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if method == "magnitude":
            scores = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()
        elif method == "wanda":
            norm_in, norm_down = x_in.pow(2).sum(0).sqrt(), x_down.pow(2).sum(0).sqrt()
            scores = (gate.abs() * norm_in).sum(1) + (up.abs() * norm_in).sum(1) + (down.abs() * norm_down).sum(0)
        else:  # flap: fluctuation of the neuron's activation times its output column's squared norm
            scores = x_down.var(0, unbiased=False) * down.pow(2).sum(0)
        kept = kept_width(scores.numel(), ratio)
        removed = torch.argsort(scores, descending=True, stable=True)[kept:]
        mlp.gate_proj.weight[removed] = 0
        mlp.up_proj.weight[removed] = 0
        mlp.down_proj.weight[:, removed] = 0
        outputs = [layer(x, *args, **kwargs) for x in inputs]
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap"])
def test_neuron_scores_equal_a_whole_model_computation(checkpoint_factory, tmp_path, method):
    folder = checkpoint_factory(num_layers=3, hidden=64, intermediate=128)
    report = run_structured(folder, tmp_path / "out", method, neuron_refit=False)
    expected = structured_in_memory(folder, calibration_windows(folder), method, 0.25).state_dict()
    written = read_all_tensors(tmp_path / "out")
    for name, tensor in written.items():
        assert torch.equal(tensor == 0, expected[name] == 0), name
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert {m["neurons_kept"] for m in report["modules"].values()} == {96}
    assert "MLP neurons per layer: 128 -> 96, zeroed" in format_summary(report)


@torch.no_grad()
def test_refit_is_least_squares_on_the_kept_neurons():
    torch.manual_seed(0)
    tokens, width, out = 300, 24, 10
    x = torch.randn(tokens, width, dtype=torch.float64) @ torch.randn(width, width, dtype=torch.float64)
    weight = torch.randn(out, width, dtype=torch.float64)
    moments = InputMoments.empty(width, torch.device("cpu"))
    for part in x.split(64):  # micro-batches
        moments.add(part, with_gram=True)
    kept = torch.tensor([0, 2, 3, 7, 8, 11, 15, 16, 20, 23])
    refit, shift = refit_output(weight, moments, kept, with_bias=False, percdamp=0.0)
    expected = torch.linalg.lstsq(x[:, kept], x @ weight.T).solution.T
    assert torch.allclose(refit, expected, atol=1e-9) and shift is None
    refit, shift = refit_output(weight, moments, kept, with_bias=True, percdamp=0.0)
    ones = torch.ones(tokens, 1, dtype=torch.float64)
    solution = torch.linalg.lstsq(torch.cat([x[:, kept], ones], 1), x @ weight.T).solution.T
    assert torch.allclose(refit, solution[:, :-1], atol=1e-9) and torch.allclose(shift, solution[:, -1], atol=1e-9)
    # Damping shrinks the fit towards zero, never past the unrefitted error on these inputs.
    damped, _ = refit_output(weight, moments, kept, with_bias=False, percdamp=0.01)
    error = lambda w: float((x @ weight.T - x[:, kept] @ w.T).norm())  # noqa: E731
    assert error(expected) <= error(damped) < error(weight[:, kept])


def test_refit_lowers_the_block_error_and_is_on_by_default(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(num_layers=3, hidden=64, intermediate=128)
    refit = run_structured(folder, tmp_path / "refit", "wanda")
    plain = run_structured(folder, tmp_path / "plain", "wanda", neuron_refit=False)
    assert refit["options"]["neuron_refit"] and not plain["options"]["neuron_refit"]
    # Same neurons zeroed; the kept columns of down_proj changed by the refit, and the layer-0 output
    # (same inputs in both runs) is closer to the dense one.
    a, b, dense = read_all_tensors(tmp_path / "refit"), read_all_tensors(tmp_path / "plain"), read_all_tensors(folder)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name] == 0, b[name] == 0) and not torch.equal(a[name], b[name])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, o: seen.append(args[0]))
    with torch.no_grad():
        model(calibration_windows(folder))
    x = torch.cat(seen).reshape(-1, 128)
    error = lambda w: float((x @ dense[name].T - x @ w.T).norm())  # noqa: E731
    assert error(a[name]) < error(b[name])


@torch.no_grad()
def test_flap_compensation_keeps_the_mean_output_of_a_biased_mlp(tmp_path):
    folder = build_family(tmp_path / "opt", "opt")  # fc2 has a bias
    run_structured(folder, tmp_path / "out", "flap", neuron_refit=False)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    seen = []
    dense.model.decoder.layers[0].fc2.register_forward_hook(lambda m, args, o: seen.append(args[0]))
    dense(calibration_windows(folder))
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1])  # layer 0's inputs are the same in the pruned run
    before = dense.model.decoder.layers[0].fc2(x).mean(0)
    after = pruned.model.decoder.layers[0].fc2(x).mean(0)
    removed = (pruned.model.decoder.layers[0].fc2.weight == 0).all(0)
    assert int(removed.sum()) == 32
    assert torch.allclose(before, after, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family, method", [("llama", "wanda"), ("phi3", "flap"), ("opt", "flap"), ("gpt2", "wanda"),
                                            ("gpt_neox", "magnitude"), ("gemma2", "neuronrank_tfidf")])
def test_shrunk_checkpoint_loads_and_equals_the_zeroed_one(tmp_path, family, method):
    folder = build_family(tmp_path / family, family)
    shrunk = run_structured(folder, tmp_path / "shrunk", method, shrink=True)
    run_structured(folder, tmp_path / "zeroed", method)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk", dtype=torch.float32).eval()
    zeroed = AutoModelForCausalLM.from_pretrained(tmp_path / "zeroed", dtype=torch.float32).eval()
    ids = calibration_windows(folder)[:2]
    assert torch.allclose(small(ids).logits, zeroed(ids).logits, atol=1e-4)
    params = sum(p.numel() for p in small.parameters())
    original = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert params < original and shrunk["structured"]["params_after"] == sum(
        t.numel() for t in read_all_tensors(tmp_path / "shrunk").values())
    config = json.loads((tmp_path / "shrunk" / "config.json").read_text())
    assert 96 in config.values()  # the MLP width setting, whatever the family calls it
    index = json.loads((tmp_path / "shrunk" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in read_all_tensors(tmp_path / "shrunk").values())


@pytest.mark.parametrize("options, message", [
    (dict(prune_method="wanda", shrink=True), "goes with --sparsity_type structured"),
    (dict(prune_method="flap"), "use --sparsity_type structured"),
    (dict(prune_method="sparsegpt", sparsity_type="structured"), "needs a neuron score"),
    (dict(prune_method="wanda", sparsity_type="structured", shrink=True, layer_sparsity="owl"), "must be uniform"),
])
def test_refusals(options, message):
    with pytest.raises(OffloadPruneError, match=message):
        PruneConfig(model="m", **options).validate()


def test_shrinking_experts_is_refused_before_anything_is_written(tmp_path):
    folder = build_family(tmp_path / "mixtral", "mixtral")
    result = run_cli("--model", folder, "--save", tmp_path / "out", "--calib-data", folder / "demo.txt",
                     "--nsamples", 2, "--seqlen", 16, "--prune_method", "wanda", "--sparsity_type", "structured",
                     "--shrink")
    assert result.returncode == 2 and "Mixture-of-Experts" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
