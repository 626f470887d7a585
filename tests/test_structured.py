"""Whole MLP neurons (--sparsity_type structured): scores against a whole-model computation, the
least-squares refit against lstsq, FLAP's bias compensation, --shrink against zeroing on many
families (the smaller checkpoint loads and computes what the zeroed one does), and the refusals;
the same for whole key/value groups of attention heads (--prune-heads)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.config import OffloadPruneError, PruneConfig
from offload_prune.surgery.neurons import InputMoments, kept_width, refit_output
from offload_prune.stream.pipeline import prune
from offload_prune.stream.report import format_summary

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


@torch.no_grad()
def heads_in_memory(folder, windows, method, ratio):
    """Whole model, layer by layer: each key/value group scored by summing the method's score of the
    output projection's columns it owns, the lowest groups zeroed (their query, key and value rows,
    their output columns), pruned outputs feeding the next layer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    groups = model.config.num_key_value_heads
    inputs, (args, kwargs) = catch_layer0_inputs(model, windows)
    for layer in model.model.layers:
        attn = layer.self_attn
        seen = []
        hook = attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        for x in inputs:
            layer(x, *args, **kwargs)
        hook.remove()
        x, out = torch.cat(seen).double(), attn.o_proj.weight.double()
        if method == "magnitude":
            columns = out.pow(2).sum(0).sqrt()
        elif method == "wanda":
            columns = (out.abs() * x.pow(2).sum(0).sqrt()).sum(0)
        else:
            columns = x.var(0, unbiased=False) * out.pow(2).sum(0)
        scores = columns.reshape(groups, -1).sum(1)
        for g in torch.argsort(scores, descending=True, stable=True)[max(1, round((1 - ratio) * groups)):]:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                rows = proj.out_features // groups
                proj.weight[g * rows:(g + 1) * rows] = 0
            width = attn.o_proj.in_features // groups
            attn.o_proj.weight[:, g * width:(g + 1) * width] = 0
        outputs = [layer(x, *args, **kwargs) for x in inputs]
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap"])
def test_head_scores_equal_a_whole_model_computation(checkpoint_factory, tmp_path, method):
    folder = checkpoint_factory(num_layers=3, hidden=64, intermediate=128, heads=8, kv_heads=4)
    report = run_structured(folder, tmp_path / "out", method, sparsity_ratio=0.0, prune_heads=0.5,
                            neuron_refit=False)
    assert report["structured"]["key_value_groups"] == [[4, 2]]
    expected = heads_in_memory(folder, calibration_windows(folder), method, 0.5).state_dict()
    got = read_all_tensors(tmp_path / "out")
    for name, tensor in got.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    q = got["model.layers.1.self_attn.q_proj.weight"]
    assert int((q == 0).all(1).sum()) == q.shape[0] // 2  # half the query heads (two groups of two) gone


@torch.no_grad()
@pytest.mark.parametrize("family, method", [("llama", "wanda"), ("qwen2", "flap"), ("gemma3_text", "magnitude")])
def test_heads_removed_load_and_equal_the_zeroed_ones(tmp_path, family, method):
    """With the MLP shrunk too and both output projections refitted; qwen2 has query/key/value
    biases, gemma3 an explicit head_dim and query/key norms."""
    folder = build_family(tmp_path / family, family)
    shrunk = run_structured(folder, tmp_path / "shrunk", method, shrink=True, prune_heads=0.5)
    run_structured(folder, tmp_path / "zeroed", method, prune_heads=0.5)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk", dtype=torch.float32).eval()
    zeroed = AutoModelForCausalLM.from_pretrained(tmp_path / "zeroed", dtype=torch.float32).eval()
    ids = calibration_windows(folder)[:2]
    assert torch.allclose(small(ids).logits, zeroed(ids).logits, atol=1e-4)
    config = json.loads((tmp_path / "shrunk" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert small.model.layers[0].self_attn.o_proj.weight.shape == (64, 32)
    assert shrunk["structured"]["key_value_groups"] == [[2, 1]] and shrunk["structured"]["params_after"] == sum(
        t.numel() for t in read_all_tensors(tmp_path / "shrunk").values())
    assert "attention key/value groups per layer: 2 -> 1" in format_summary(shrunk)


@torch.no_grad()
def test_output_projection_refit_lowers_the_attention_error(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128, heads=8, kv_heads=4)
    for refit in (True, False):
        run_structured(folder, tmp_path / str(refit), "wanda", sparsity_ratio=0.0, prune_heads=0.5, neuron_refit=refit)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, o: seen.append(args[0]))
    model(calibration_windows(folder))
    x = torch.cat(seen).reshape(-1, 64)
    name = "model.layers.0.self_attn.o_proj.weight"
    dense, refitted, plain = (read_all_tensors(f)[name] for f in (folder, tmp_path / "True", tmp_path / "False"))
    assert torch.equal(refitted == 0, plain == 0) and not torch.equal(refitted, plain)
    error = lambda w: float((x @ dense.T - x @ w.T).norm())  # noqa: E731
    assert error(refitted) < error(plain)


@pytest.mark.parametrize("options, message", [
    (dict(prune_method="wanda", shrink=True), "goes with --sparsity_type structured"),
    (dict(prune_method="flap"), "use --sparsity_type structured"),
    (dict(prune_method="sparsegpt", sparsity_type="structured"), "needs a neuron score"),
    (dict(prune_method="wanda", sparsity_type="structured", shrink=True, layer_sparsity="owl"), "must be uniform"),
    (dict(prune_method="wanda", prune_heads=0.5), "goes with --sparsity_type structured"),
    (dict(prune_method="neuronrank_tfidf", sparsity_type="structured", prune_heads=0.5), "magnitude, wanda, flap"),
    (dict(prune_method="wanda", sparsity_type="structured", prune_heads=1.0), r"must be in \[0, 1\)"),
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


@pytest.mark.parametrize("family, message", [("gpt2", "one fused matrix"), ("opt", "cannot express 2 of 4")])
def test_heads_the_config_cannot_express_are_refused_before_anything_is_written(tmp_path, family, message):
    folder = build_family(tmp_path / family, family)
    result = run_cli("--model", folder, "--save", tmp_path / "out", "--calib-data", folder / "demo.txt",
                     "--nsamples", 2, "--seqlen", 16, "--prune_method", "wanda", "--sparsity_type", "structured",
                     "--shrink", "--prune-heads", 0.5)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
