"""Block-local reconstruction (--reconstruct): the mask stays exactly, the reported errors are what the
written model computes, a failed or useless training leaves the pruned weights, and the plan holds."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.cli import main
from offload_prune.config import PruneConfig
from offload_prune.data.calibration import calibration_windows
from offload_prune.reconstruct import train as train_module
from offload_prune.reconstruct.units import trained_parameters, training_units
from offload_prune.model.loading import load_tokenizer

from conftest import folder_digests, quick_args, read_all_tensors, with_quiet_blocks
from families import build_family


def run(model, save, *extra) -> dict:
    assert main(quick_args(model, save, *extra)) == 0
    return json.loads((save / "report.json").read_text())


def first_block_error(dense_folder, pruned_folder, text, nsamples=4, seqlen=32) -> float:
    """sum |h1(pruned) - h1(dense)|^2 / sum |h1(dense)|^2 over the calibration windows, h1 being the first
    decoder layer's output as transformers computes it from the whole model."""
    windows, _ = calibration_windows(str(text), load_tokenizer(dense_folder), nsamples, seqlen, 0)
    outputs = []
    for folder in (dense_folder, pruned_folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            outputs.append(torch.cat([model(windows[i:i + 1], output_hidden_states=True).hidden_states[1]
                                      for i in range(len(windows))]).double())
    dense, pruned = outputs
    return float((pruned - dense).pow(2).sum() / dense.pow(2).sum())


def test_mask_kept_exactly_and_reported_errors_are_the_written_models(tiny_llama, tmp_path):
    # Magnitude's mask does not depend on the inputs, which reconstruction changes from block 1 on.
    common = ("--prune_method", "magnitude", "--sparsity_type", "2:4")
    plain = run(tiny_llama, tmp_path / "plain", *common)
    rebuilt = run(tiny_llama, tmp_path / "rebuilt", *common, "--reconstruct", "block", "--recon-steps", "16",
                  "--recon-lr", "1e-3")
    before, after = read_all_tensors(tmp_path / "plain"), read_all_tensors(tmp_path / "rebuilt")
    pruned = [name for name in before if name.endswith("proj.weight")]
    assert len(pruned) == 21
    for name in pruned:  # the same zeros exactly; the kept weights moved
        assert torch.equal(before[name] == 0, after[name] == 0), name
        assert not torch.equal(before[name], after[name]), name
    assert rebuilt["nm_valid"] and rebuilt["totals"] == plain["totals"]
    for name in set(before) - set(pruned):  # embedding, norms, head: not trained
        assert torch.equal(before[name], after[name]), name
    blocks = rebuilt["reconstruction"]["blocks"]
    assert all(entry["kept"] and entry["error_after"] < entry["error_before"] for entry in blocks.values())
    # Block 0 sees the embedding's outputs in both streams: its reported errors are those of the written models.
    text = tiny_llama / "demo.txt"
    assert blocks["0"]["error_before"] == pytest.approx(first_block_error(tiny_llama, tmp_path / "plain", text), rel=1e-4)
    assert blocks["0"]["error_after"] == pytest.approx(first_block_error(tiny_llama, tmp_path / "rebuilt", text),
                                                       rel=1e-4)


@pytest.mark.parametrize("extra", [
    ("--reconstruct", "sublayer", "--recon-target", "dense-block"),
    ("--reconstruct", "block", "--recon-target", "dense-block", "--offload-activations", "disk"),
    ("--reconstruct", "sublayer", "--recon-target", "dense-stream", "--recon-optimizer", "sgd", "--recon-lr", "1e-2"),
])
def test_modes_and_targets_lower_the_error_and_keep_the_zeros(tiny_llama, tmp_path, extra):
    plain = run(tiny_llama, tmp_path / "plain", "--prune_method", "sparsegpt")
    rebuilt = run(tiny_llama, tmp_path / "rebuilt", "--prune_method", "sparsegpt", *extra)
    before, after = read_all_tensors(tmp_path / "plain"), read_all_tensors(tmp_path / "rebuilt")
    for name in before:  # block 0's inputs are the same in both runs, so is its mask; the others' differ
        if "layers.0." in name:
            assert torch.equal(before[name] == 0, after[name] == 0), name
    assert rebuilt["totals"] == plain["totals"]
    blocks = rebuilt["reconstruction"]["blocks"]
    assert sum(entry["kept"] for entry in blocks.values()) >= 2
    assert all(entry["error_after"] <= entry["error_before"] for entry in blocks.values())
    units = set(blocks["0"]["units"])
    assert units == ({"self_attn", "mlp"} if "sublayer" in extra else {"block"})
    assert not list((tmp_path / "rebuilt").glob(".recon-target*"))  # the scratch target is gone


@pytest.mark.parametrize("mode", ["block", "sublayer"])
def test_structured_shrunk_shapes_are_trained_as_they_are(tiny_llama, tmp_path, mode):
    """Neurons and key/value groups removed: the shrunk matrices train in their new shapes and the model
    written loads with the shrunk config. --recon-norms trains the norms a unit holds: in block mode the
    block's, in sublayer mode none of Llama's (they sit outside its attention and MLP)."""
    common = ("--sparsity_type", "structured", "--shrink", "--prune-heads", "0.5", "--sparsity_ratio", "0.25")
    run(tiny_llama, tmp_path / "plain", *common)
    rebuilt = run(tiny_llama, tmp_path / "rebuilt", *common, "--reconstruct", mode, "--recon-norms",
                  "--recon-lr", "1e-3")
    before, after = read_all_tensors(tmp_path / "plain"), read_all_tensors(tmp_path / "rebuilt")
    assert {n: t.shape for n, t in before.items()} == {n: t.shape for n, t in after.items()}
    norms_moved = [n for n in before if "layernorm" in n and not torch.equal(before[n], after[n])]
    assert bool(norms_moved) == (mode == "block")
    assert all(e["kept"] for e in rebuilt["reconstruction"]["blocks"].values())
    AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")


def test_experts_train_on_their_tokens_and_the_router_stays(tmp_path):
    model = build_family(tmp_path / "model", "qwen2_moe")  # routed experts, a shared expert and its gate
    run(model, tmp_path / "plain", "--expert-min-tokens", "1")
    rebuilt = run(model, tmp_path / "rebuilt", "--expert-min-tokens", "1", "--reconstruct", "block",
                  "--recon-lr", "1e-3")
    before, after = read_all_tensors(tmp_path / "plain"), read_all_tensors(tmp_path / "rebuilt")
    routers = [n for n in before if n.endswith("mlp.gate.weight") or n.endswith("shared_expert_gate.weight")]
    experts = [n for n in before if ".experts." in n]
    assert routers and experts
    assert all(torch.equal(before[n], after[n]) for n in routers)
    assert any(not torch.equal(before[n], after[n]) for n in experts)
    assert all(torch.equal(before[n] == 0, after[n] == 0) for n in before if "layers.0." in n)
    assert any(e["kept"] for e in rebuilt["reconstruction"]["blocks"].values())


def test_a_non_finite_loss_or_no_gain_writes_the_pruned_blocks_unchanged(tiny_llama, tmp_path, monkeypatch):
    run(tiny_llama, tmp_path / "plain")
    original = train_module._Trainer._loss_function

    def poisoned(self, unit, dense):
        loss = original(self, unit, dense)
        return lambda params, rows: loss(params, rows) * float("nan")
    monkeypatch.setattr(train_module._Trainer, "_loss_function", poisoned)
    report = run(tiny_llama, tmp_path / "nan", "--reconstruct", "sublayer")
    assert folder_digests(tmp_path / "nan") == folder_digests(tmp_path / "plain")
    for entry in report["reconstruction"]["blocks"].values():
        assert not entry["kept"] and entry["error_after"] == entry["error_before"]
        assert "non-finite loss at step 1" in entry["fallback"]
    monkeypatch.undo()
    # A learning rate that only makes things worse: every block keeps its pruned weights.
    report = run(tiny_llama, tmp_path / "worse", "--reconstruct", "block", "--recon-lr", "10", "--recon-steps", "4")
    assert folder_digests(tmp_path / "worse") == folder_digests(tmp_path / "plain")
    assert all(not e["kept"] and e["error_trained"] > e["error_before"]
               for e in report["reconstruction"]["blocks"].values())


def hidden_states(folder, text, nsamples=4, seqlen=32) -> tuple:
    """Every decoder layer's input and the last one's output (before the final norm), float64, over the
    calibration windows."""
    windows, _ = calibration_windows(str(text), load_tokenizer(folder), nsamples, seqlen, 0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    last = []
    model.model.norm.register_forward_pre_hook(lambda module, args: last.append(args[0]))
    with torch.no_grad():
        states = [model(windows[i:i + 1], output_hidden_states=True).hidden_states[:-1] for i in range(len(windows))]
    return tuple(torch.cat(layer).double() for layer in zip(*states)) + (torch.cat(last).double(),)


def relative(a, b) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.mark.parametrize("target", ["dense-block", "dense-stream"])
def test_shortgpt_kept_blocks_stand_in_for_the_removed_ones(checkpoint_factory, tmp_path, target):
    """Blocks 1 and 3 of 5 removed: the block after each gap trains towards the dense blocks it stands in
    for; the errors it reports are what the written models compute; blocks that stand in for nothing are
    the stored bytes (dense-block), or trained only after the first gap (dense-stream)."""
    model = with_quiet_blocks(checkpoint_factory(num_layers=5, hidden=64, intermediate=128), tmp_path / "model",
                              blocks=(1, 3))
    common = ("--prune_method", "shortgpt", "--remove-layers", "2")
    run(model, tmp_path / "plain", *common)
    rebuilt = run(model, tmp_path / "rebuilt", *common, "--reconstruct", "block", "--recon-target", target,
                  "--recon-steps", "16")
    assert rebuilt["block_removal"]["removed"] == [1, 3]
    blocks = rebuilt["reconstruction"]["blocks"]
    assert {i: e["stands_in_for"] for i, e in blocks.items()} == {"1": [1], "2": [3]}
    assert all(e["kept"] and e["error_after"] < e["error_before"] for e in blocks.values())
    before, after = read_all_tensors(tmp_path / "plain"), read_all_tensors(tmp_path / "rebuilt")
    for name in before:  # new block 0 (old 0) stands in for nothing; the norms outside the blocks never train
        assert torch.equal(before[name], after[name]) == ("layers.1." not in name and "layers.2." not in name
                                                          or "layernorm" in name), name
    # New block 1 (old 2) gets the dense model's hidden states at block 1 in both runs: its errors against
    # the dense model's at block 3 are the written models'.
    dense = hidden_states(model, model / "demo.txt")
    plain, rebuilt_states = (hidden_states(tmp_path / f, model / "demo.txt") for f in ("plain", "rebuilt"))
    assert blocks["1"]["error_before"] == pytest.approx(relative(plain[2], dense[3]), rel=1e-4)
    assert blocks["1"]["error_after"] == pytest.approx(relative(rebuilt_states[2], dense[3]), rel=1e-4)
    if target == "dense-stream":  # the last kept block's target is the dense model's at the end
        assert blocks["2"]["error_after"] == pytest.approx(relative(rebuilt_states[3], dense[5]), rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (("--recon-steps", "0"), "--recon-steps and --recon-batch must be >= 1"),
    (("--recon-lr", "0"), "--recon-lr must be > 0"),
    (("--recon-lr", "-0.001"), "--recon-lr must be > 0"),
    (("--reconstruct", "layer"), "invalid choice"),
    (("--reconstruct", "block", "--max-device-memory", "300KiB"), "try --reconstruct sublayer"),
])
def test_bad_reconstruction_options_are_one_line_and_write_nothing(tiny_llama, tmp_path, capsys, flags, message):
    assert main(quick_args(tiny_llama, tmp_path / "out", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_units_are_the_attention_then_the_mlp_and_routers_never_train():
    from transformers import AutoConfig

    from families import EXTRA, FAMILIES
    from offload_prune.model.matrices import describe, find_matrices
    from offload_prune.model.skeleton import build_skeleton

    _, _, layers = build_skeleton(AutoConfig.for_model("qwen2_moe", **{**FAMILIES, **EXTRA}["qwen2_moe"][0]))
    matrices = find_matrices(layers[0])
    describe(layers[0], matrices)
    trained = trained_parameters(layers[0], matrices, with_norms=False)
    assert "mlp.gate.weight" not in trained and "mlp.shared_expert_gate.weight" not in trained
    assert "mlp.experts.gate_up_proj" in trained and "self_attn.q_proj.weight" in trained
    assert all(p.dim() >= 2 for p in trained.values())
    assert training_units("sublayer", trained, lambda names: list(reversed(names))) == ["mlp", "self_attn"]
    assert training_units("block", trained, lambda names: names) == [""]
    with_norms = trained_parameters(layers[0], matrices, with_norms=True)
    assert "input_layernorm.weight" in with_norms and "self_attn.q_proj.bias" in with_norms


def test_steps_draw_every_window_once_per_pass():
    batches = train_module.window_batches(10, 4, 7, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(sum(batches[:3], [])) == list(range(10)) == sorted(sum(batches[3:6], []))
    assert batches == train_module.window_batches(10, 4, 7, seed=3) != train_module.window_batches(10, 4, 7, seed=4)


def test_the_result_options_name_reconstruction_only_when_on():
    off = PruneConfig(model="m").validate().result_options()
    on = PruneConfig(model="m", reconstruct="block").validate().result_options()
    assert "recon_lr" not in off and on["recon_lr"] == 1e-3 and on["reconstruct"] == "block"
