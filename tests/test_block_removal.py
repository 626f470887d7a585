"""ShortGPT: Block Influence against a whole-model computation, the smaller checkpoint against the
whole model with the same blocks deleted, the parameter budget, and the refusals."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload_prune.surgery.block_removal import check_blocks_expressed, config_without_blocks, lowest_influence
from offload_prune.config import OffloadPruneError, PruneConfig
from offload_prune.stream.pipeline import prune
from offload_prune.stream.report import format_summary
from offload_prune.model.skeleton import build_skeleton

from conftest import read_all_tensors, run_cli
from families import FAMILIES, build_family
from reference import catch_layer0_inputs
from test_streaming_matches_in_memory import NSAMPLES, SEQLEN, calibration_windows

LAYERS = 5


def remove_blocks(folder, save, **options):
    return prune(PruneConfig(model=str(folder), save=save, prune_method="shortgpt", calib_data=str(folder / "demo.txt"),
                             nsamples=NSAMPLES, seqlen=SEQLEN, quiet=True, **options))


@torch.no_grad()
def whole_model_influence(folder, windows, layers_path="model.layers"):
    """1 - mean over all calibration tokens of cos(layer input, layer output), whole model, dense."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, (args, kwargs) = catch_layer0_inputs(model, windows, layers_path)
    influence = []
    for layer in model.get_submodule(layers_path):
        outputs = [layer(x, *args, **kwargs) for x in inputs]
        outputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
        cos = torch.cat([torch.nn.functional.cosine_similarity(x, y, dim=-1).flatten()
                         for x, y in zip(inputs, outputs)])
        influence.append(1 - float(cos.double().mean()))
        inputs = outputs
    return influence


@pytest.fixture(scope="module")
def five_blocks(checkpoint_factory):
    return checkpoint_factory(num_layers=LAYERS, hidden=64, intermediate=128)


def test_influence_equals_whole_model_and_lowest_blocks_go(five_blocks, tmp_path):
    report = remove_blocks(five_blocks, tmp_path / "out", remove_layers="2")
    removal = report["block_removal"]
    expected = whole_model_influence(five_blocks, calibration_windows(five_blocks))
    assert removal["influence"] == pytest.approx(expected, abs=1e-5)
    assert removal["removed"] == sorted(sorted(range(LAYERS), key=lambda i: expected[i])[:2])
    assert removal["blocks_after"] == LAYERS - 2
    written, original = read_all_tensors(tmp_path / "out"), read_all_tensors(five_blocks)
    kept = [i for i in range(LAYERS) if i not in removal["removed"]]
    for name, tensor in original.items():  # kept blocks renumbered and copied bit-exactly; the rest as is
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index in kept:
                assert torch.equal(written[name.replace(f".{index}.", f".{kept.index(index)}.", 1)], tensor)
        else:
            assert torch.equal(written[name], tensor)
    assert len(written) == len(original) - 2 * len([n for n in original if n.startswith("model.layers.0.")])
    assert removal["params_after"] == sum(t.numel() for t in written.values())
    assert removal["params_before"] == sum(t.numel() for t in original.values())
    summary = format_summary(report)
    assert f"removed 2 of {LAYERS} blocks" in summary and "parameters:" in summary


@torch.no_grad()
def test_angular_distance_equals_whole_model_and_removes_the_closest_run(five_blocks, tmp_path):
    report = remove_blocks(five_blocks, tmp_path / "out", remove_layers="2", angular=True)
    removal = report["block_removal"]
    model = AutoModelForCausalLM.from_pretrained(five_blocks, dtype=torch.float32).eval()
    inputs, (args, kwargs) = catch_layer0_inputs(model, calibration_windows(five_blocks))
    boundaries = [torch.cat([x[:, -1] for x in inputs])]
    for layer in model.model.layers:
        inputs = [layer(x, *args, **kwargs) for x in inputs]
        inputs = [out[0] if isinstance(out, tuple) else out for out in inputs]
        boundaries.append(torch.cat([x[:, -1] for x in inputs]))
    expected = [float(torch.arccos(torch.nn.functional.cosine_similarity(
        boundaries[l].double(), boundaries[l + 2].double(), dim=-1).clamp(-1, 1)).mean() / torch.pi)
        for l in range(LAYERS - 1)]
    assert removal["angular_distance"] == pytest.approx(expected, abs=1e-6)
    start = min(range(len(expected)), key=expected.__getitem__)
    assert removal["removed"] == [start, start + 1] and removal["rule"] == "angular distance"
    assert "closest run by angular distance" in format_summary(report)


def test_lowest_influence_breaks_ties_towards_later_blocks():
    assert lowest_influence([0.5, 0.1, 0.3, 0.1], 2) == [1, 3]
    assert lowest_influence([0.5, 0.1, 0.3, 0.1], 3) == [1, 2, 3]
    with pytest.raises(OffloadPruneError, match="at least one must remain"):
        lowest_influence([0.5, 0.1], 2)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_oss", "gpt2", "opt", "qwen2_moe", "mixtral"])
def test_smaller_checkpoint_loads_and_equals_the_model_with_those_blocks_deleted(tmp_path, family, monkeypatch):
    arguments, layers_path, _ = FAMILIES[family]
    config_extra = {"num_hidden_layers": 4} if "num_hidden_layers" in arguments else {"n_layer": 4}
    if family == "gpt_oss":
        config_extra["layer_types"] = ["sliding_attention", "full_attention"] * 2
    if family == "gemma3_text":
        config_extra["sliding_window_pattern"] = 2  # alternating: the kept blocks no longer follow the pattern
    monkeypatch.setitem(FAMILIES, family, ({**arguments, **config_extra}, layers_path, ()))
    folder = build_family(tmp_path / "model", family)
    report = remove_blocks(folder, tmp_path / "out", remove_layers="2")
    removed = report["block_removal"]["removed"]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = reference.get_submodule(layers_path)
    for index in sorted(removed, reverse=True):
        del layers[index]
    assert len(pruned.get_submodule(layers_path)) == 2
    ids = calibration_windows(folder)[:2]
    assert torch.allclose(pruned(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, atol=1e-5)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = AutoConfig.from_pretrained(folder)
    if getattr(original, "layer_types", None):
        assert written["layer_types"] == [t for i, t in enumerate(original.layer_types) if i not in removed]


def test_parameter_budget_removes_the_fewest_blocks(five_blocks, tmp_path):
    full = remove_blocks(five_blocks, tmp_path / "one", remove_layers="1")["block_removal"]
    per_block = full["params_before"] - full["params_after"]
    budget = full["params_before"] - 2 * per_block - 1  # just below two blocks' worth: three must go
    removal = remove_blocks(five_blocks, tmp_path / "auto", remove_layers="auto",
                            target_params=str(budget))["block_removal"]
    assert len(removal["removed"]) == 3 and removal["params_after"] <= budget
    assert removal["removed"] == lowest_influence(full["influence"], 3)
    with pytest.raises(OffloadPruneError, match="even with one block left"):
        remove_blocks(five_blocks, tmp_path / "tiny", remove_layers="auto", target_params="1000")


def test_config_that_cannot_describe_the_remaining_blocks_is_refused():
    # Jamba alternates Mamba and attention blocks by a period: removing block 0 shifts every kept block.
    config = AutoConfig.for_model("jamba", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                  expert_layer_offset=1, vocab_size=260)
    _, _, layers = build_skeleton(config)
    kept = [1, 2, 3]
    edited = config_without_blocks(config.to_dict(), config, kept)
    _, _, new_layers = build_skeleton(type(config).from_dict(edited))
    with pytest.raises(OffloadPruneError, match="cannot describe the blocks that remain: block 1"):
        check_blocks_expressed(layers, new_layers, kept, [])
    kept = [2, 3]  # a whole period removed: every kept block is built as before
    edited = config_without_blocks(config.to_dict(), config, kept)
    _, _, new_layers = build_skeleton(type(config).from_dict(edited))
    check_blocks_expressed(layers, new_layers, kept, [])


@pytest.mark.parametrize("args, message", [
    (["--prune_method", "shortgpt"], "needs --remove-layers"),
    (["--prune_method", "wanda", "--remove-layers", "2"], "go with --prune_method shortgpt"),
    (["--prune_method", "shortgpt", "--remove-layers", "auto"], "needs --target-params"),
    (["--prune_method", "shortgpt", "--remove-layers", "two"], "must be a number of blocks"),
    (["--prune_method", "shortgpt", "--remove-layers", "auto", "--target-params", "lots"], "not a number of parameters"),
    (["--prune_method", "shortgpt", "--remove-layers", "1", "--sparsity_type", "2:4"], "do not apply"),
    (["--prune_method", "shortgpt", "--remove-layers", "auto", "--target-params", "1M", "--angular"], "not auto"),
])
def test_refusals_are_one_line(tiny_llama, tmp_path, args, message):
    result = run_cli("--model", tiny_llama, "--save", tmp_path / "out", "--calib-data", tiny_llama / "demo.txt",
                     "--nsamples", 2, "--seqlen", 16, *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr
    assert not (tmp_path / "out").exists()


def test_removing_every_block_is_refused_in_one_line(tiny_llama, tmp_path):
    result = run_cli("--model", tiny_llama, "--save", tmp_path / "out", "--calib-data", tiny_llama / "demo.txt",
                     "--nsamples", 2, "--seqlen", 16, "--prune_method", "shortgpt", "--remove-layers", 3)
    assert result.returncode == 2 and "at least one must remain" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
