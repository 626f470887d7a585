"""Every family transformers loads as a causal LM: found, pruned, written back in the input's own
layout, and equal to whole-model pruning; Mixture-of-Experts experts pruned one by one."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from offload_prune.data.calibration import load_text, sample_windows, tokenize
from offload_prune.cli import main
from offload_prune.config import PruneConfig
from offload_prune.stream.pipeline import prune

from conftest import read_all_tensors
from families import DENSE, FAMILIES, MIXTURE, build_family
from reference import prune_in_memory

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_family(tmp_path_factory.mktemp(family), family)
        return built[family]
    return get


def windows_of(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return sample_windows(tokenize(tokenizer, load_text(str(folder / "demo.txt"))), NSAMPLES, SEQLEN, 0)


def run(folder, save, method="wanda", **extra):
    return prune(PruneConfig(model=str(folder), save=save, prune_method=method, sparsity_ratio=0.5,
                             calib_data=str(folder / "demo.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, quiet=True,
                             **extra))


def check_same_layout(save, folder):
    written, original = read_all_tensors(save), read_all_tensors(folder)
    assert set(written) == set(original)
    for name, tensor in written.items():
        assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape, name
    return written, original


@pytest.mark.parametrize("family", DENSE + MIXTURE)
def test_family_streamed_equals_whole_model(family_checkpoint, tmp_path, family):
    """Wanda on dense families, magnitude on Mixture-of-Experts ones (the whole-model reference has no
    routed statistics; those are checked against the model's own expert loop below)."""
    folder = family_checkpoint(family)
    _, layers_path, routers = FAMILIES[family]
    method = "magnitude" if routers else "wanda"
    report = run(folder, tmp_path / "out", method)
    written, original = check_same_layout(tmp_path / "out", folder)

    reference = prune_in_memory(folder, windows_of(folder), method, 0.5, None, layers_path, routers)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    expected = reference.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{family}: {name} differs from whole-model pruning"
    ids = windows_of(folder)[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)

    # The totals count every weight matrix of the blocks: routers stay dense and show as such.
    for kind in ("attention", "mlp"):
        assert report["totals"][kind]["sparsity"] == 0.5, kind
    router_modules = [n for n in report["unpruned"] if n.endswith(routers)] if routers else []
    assert len(router_modules) == len(routers) * 2 and all(report["unpruned"][n]["sparsity"] == 0
                                                            for n in router_modules)
    assert set(report["unpruned"]) == set(router_modules)
    written_zeros = sum(int((t == 0).sum()) for n, t in written.items() if t.dim() >= 2 and layers_path in n)
    assert report["totals"]["all"]["zeros"] == written_zeros - sum(
        int((t == 0).sum()) for n, t in original.items() if t.dim() >= 2 and layers_path in n)


@pytest.mark.parametrize("family", MIXTURE)
def test_experts_pruned_one_by_one_with_wanda(family_checkpoint, tmp_path, family):
    folder = family_checkpoint(family)
    report = run(folder, tmp_path / "out", "wanda", expert_min_tokens=1)
    written, _ = check_same_layout(tmp_path / "out", folder)
    experts = {n: m for n, m in report["modules"].items() if ".experts." in n}
    config = AutoModelForCausalLM.from_pretrained(folder).config
    count = getattr(config, "num_experts", None) or config.num_local_experts
    assert len(experts) == 2 * count * 2  # per layer: gate_up and down of every expert
    assert all(m["sparsity"] == 0.5 and m["kind"] == "mlp" for m in experts.values())
    for name, tensor in written.items():
        if ".experts." in name and tensor.dim() >= 2 and not name.endswith("bias"):
            # Wanda compares within each output row: every row of each expert is exactly half zeros
            # (gpt-oss stores [experts, in, out]: a row is a column there).
            zeros = (tensor == 0).sum(dim=-2 if family == "gpt_oss" else -1)
            width = tensor.shape[-2 if family == "gpt_oss" else -1]
            assert bool((zeros == width // 2).all()), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_expert_statistics_come_from_the_tokens_routed_to_it(family_checkpoint):
    """The inputs hooks hand a method for expert e equal what the model's own expert loop feeds it,
    scaled by the router weight of each token when asked."""
    from offload_prune.model.matrices import find_matrices, observe
    folder = family_checkpoint("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, experts_implementation="eager").eval()
    moe = model.model.layers[0].mlp
    experts = moe.experts
    x = torch.randn(1, 24, 64, dtype=torch.float64)
    # What the model's own loop computes: routing from its router, then per expert its tokens in the
    # order the loop visits them.
    with torch.no_grad():
        _, weights, index = moe.gate(x.reshape(-1, 64))
    matrices = {n: m for n, m in find_matrices(model.model.layers[0]).items() if ".experts." in n}
    for weighted in (False, True):
        seen: dict[str, list] = {}
        handles = observe(matrices, lambda n, a, b: seen.setdefault(n, []).append(a), weighted)
        with torch.no_grad():
            moe(x)
        for h in handles:
            h.remove()
        for e in range(experts.num_experts):
            slot, token = torch.where(index.T == e)
            if token.numel() == 0:
                continue
            routed = x.reshape(-1, 64)[token]
            scale = weights[token, slot][:, None] if weighted else torch.ones(len(token), 1, dtype=x.dtype)
            got = torch.cat(seen[f"mlp.experts.{e}.gate_up_proj"])
            assert torch.allclose(got.T @ got, (routed * scale).T @ (routed * scale))  # same Hessian
            gate, up = (routed @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up * scale
            got = torch.cat(seen[f"mlp.experts.{e}.down_proj"])
            assert torch.allclose(got.T @ got, hidden.T @ hidden)


def test_router_dense_unless_asked_and_starved_experts_fall_back(family_checkpoint, tmp_path):
    folder = family_checkpoint("qwen2_moe")
    report = run(folder, tmp_path / "router", "wanda", prune_router=True)
    routers = [n for n in report["modules"] if n.endswith(("mlp.gate", "shared_expert_gate"))]
    assert len(routers) == 4 and all(report["modules"][n]["kind"] == "router" for n in routers)
    assert report["totals"]["all"]["sparsity"] == 0.5
    # Every expert saw fewer tokens than asked for: all fall back to magnitude, and say so.
    report = run(folder, tmp_path / "fallback", "sparsegpt", expert_min_tokens=10 ** 6)
    experts = {n: m for n, m in report["modules"].items() if ".experts." in n}
    assert experts and all(m["rule"] == "magnitude" and m["fallback"] == "few routed tokens"
                           for m in experts.values())
    assert all(m["routed_tokens"] == m["calibration_tokens"] < 10 ** 6 for m in experts.values())
    dense = [m for n, m in report["modules"].items() if ".experts." not in n]
    assert dense and all(m["rule"] == "sparsegpt" for m in dense)
    from offload_prune.stream.report import format_summary
    assert f"{len(experts)} matrices (few routed tokens)" in format_summary(report)


def test_true_sequential_follows_the_call_order_of_fused_projections(family_checkpoint):
    """Phi-3 defines o_proj before qkv_proj; the stages follow its forward: qkv, o, gate_up, down."""
    from offload_prune.disk.checkpoint import CheckpointReader
    from offload_prune.model.matrices import describe, find_matrices
    from offload_prune.methods.sparsegpt import SparseGPT
    from offload_prune.model.skeleton import StreamedModel, run_windows
    folder = family_checkpoint("phi3")
    cpu = torch.device("cpu")
    streamed = StreamedModel(CheckpointReader(str(folder)), cpu, torch.float32)
    streamed.load_outside(with_head=False)
    hidden, layer_kwargs = streamed.capture(windows_of(folder)[:1])
    block = streamed.load_block(0)
    matrices = find_matrices(block)
    assert list(matrices)[:2] == ["self_attn.o_proj", "self_attn.qkv_proj"]  # definition order
    describe(block, matrices, probe=lambda: run_windows(block, layer_kwargs[0], hidden, None, 1, cpu))
    method = SparseGPT(PruneConfig(model="-", prune_method="sparsegpt", true_sequential=True).validate())
    assert method.groups(matrices) == [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"],
                                       ["mlp.down_proj"]]
    assert [matrices[n].position for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                           "mlp.down_proj")] == ["in", "out", "in", "out"]


def roles_of(matrices):
    return {n: (m.kind, m.unit, m.position, m.stage) for n, m in matrices.items()}


@pytest.mark.parametrize("family", [*FAMILIES, "jamba"])
def test_blocks_alike_take_the_roles_of_the_first_without_a_probe(family_checkpoint, family):
    """Each block's roles and stages from its own probe equal those `DescribedBlocks` gives it; blocks
    alike in structure are probed once (gpt-oss's alternate sliding and full attention layers too).
    Jamba's two blocks differ (Mamba, attention + experts): two probes."""
    from offload_prune.disk.checkpoint import CheckpointReader
    from offload_prune.model.matrices import DescribedBlocks, describe, find_matrices
    from offload_prune.model.skeleton import StreamedModel, run_windows
    folder = family_checkpoint(family)
    cpu = torch.device("cpu")
    streamed = StreamedModel(CheckpointReader(str(folder)), cpu, torch.float32)
    streamed.load_outside(with_head=False)
    hidden, layer_kwargs = streamed.capture(windows_of(folder)[:1])  # the kwargs of one window
    described, probes = DescribedBlocks(), []
    for index in range(streamed.num_layers):
        block = streamed.load_block(index)
        own = find_matrices(block)
        describe(block, own, probe=lambda: run_windows(block, layer_kwargs[index], hidden, None, 1, cpu))
        shared = find_matrices(block)
        described.describe(block, shared, lambda: probes.append(index) or run_windows(
            block, layer_kwargs[index], hidden, None, 1, cpu))
        assert roles_of(shared) == roles_of(own), (family, index)
        run_windows(block, layer_kwargs[index], hidden, hidden, 1, cpu)
        streamed.unload_block(index)
    assert probes == ([0] if family != "jamba" else [0, 1])


def test_a_block_whose_probe_missed_a_matrix_is_probed_again():
    """A matrix the probe never saw called (an expert routed no token, a projection read as a weight)
    means the roles may depend on the input: they are not reused."""
    from offload_prune.model.matrices import DescribedBlocks, find_matrices

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.spare = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x, calls):
            return self.down(sum(getattr(self, name)(x) for name in calls))

    described, probes = DescribedBlocks(), []
    for calls in (["up"], ["up"], ["spare", "up"]):
        block = Block()
        matrices = find_matrices(block)
        described.describe(block, matrices, lambda: probes.append(calls) or block(torch.ones(1, 8), calls))
        assert [matrices[name].stage for name in (*calls, "down")] == [0] * len(calls) + [1]
    assert probes == [["up"], ["up"], ["spare", "up"]]
    # Every matrix called: the next block alike takes its roles, not probed.
    alike = Block()
    matrices = find_matrices(alike)
    described.describe(alike, matrices, lambda: probes.append("again"))
    assert probes[-1] != "again" and [matrices[name].stage for name in ("spare", "up", "down")] == [0, 0, 1]


def test_selection_flags_mean_the_same_on_opt(family_checkpoint, tmp_path):
    report = run(family_checkpoint("opt"), tmp_path / "out", "wanda", nr_include_attention=False)
    assert sorted(n.rsplit(".", 1)[-1] for n in report["modules"]) == ["fc1", "fc1", "fc2", "fc2"]
    report = run(family_checkpoint("gpt2"), tmp_path / "last", "wanda", pruning_last=1)
    assert sorted(report["modules"]) == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def test_structured_removes_both_halves_of_a_fused_gate_up(family_checkpoint, tmp_path):
    run(family_checkpoint("phi3"), tmp_path / "out", "neuronrank_old", sparsity_type="structured")
    written = read_all_tensors(tmp_path / "out")
    gate_up = written["model.layers.0.mlp.gate_up_proj.weight"]
    down = written["model.layers.0.mlp.down_proj.weight"]
    removed = (down == 0).all(dim=0)
    assert int(removed.sum()) == 128 // 2  # intermediate size 128, ratio 0.5
    assert torch.equal((gate_up[:128] == 0).all(dim=1), removed)
    assert torch.equal((gate_up[128:] == 0).all(dim=1), removed)



def test_unused_checkpoint_tensors_are_copied(family_checkpoint, tmp_path):
    folder = tmp_path / "model"
    import shutil
    shutil.copytree(family_checkpoint("llama"), folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    tensors = load_file(shard)
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors[extra] = torch.arange(8, dtype=torch.float32)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][extra] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    run(folder, tmp_path / "out")
    written = read_all_tensors(tmp_path / "out")
    assert torch.equal(written[extra], torch.arange(8, dtype=torch.float32))
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("damage, words", [
    ("drop", "checkpoint has no tensor for model.layers.1.mlp.down_proj.weight"),
    ("shape", "has shape"),
])
def test_bad_checkpoint_refused_before_any_work(family_checkpoint, tmp_path, capsys, damage, words):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(family_checkpoint("llama"), folder)
    if damage == "drop":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 96
        (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # what building the checkpoint printed
    code = main(["--model", str(folder), "--save", str(tmp_path / "out"), "--calib-data", str(folder / "demo.txt"),
                 "--nsamples", "2", "--seqlen", "16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_weights_shared_across_layers_are_refused(tmp_path, monkeypatch, capsys):
    """A model whose layers share a weight cannot be loaded one block at a time: one line says why."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from offload_prune.demo import byte_tokenizer
    monkeypatch.setattr(LlamaForCausalLM, "_tied_weights_keys",
                        {"model.layers.1.mlp.down_proj.weight": "model.layers.0.mlp.down_proj.weight",
                         "lm_head.weight": "model.embed_tokens.weight"})
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=260, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("some text " * 100)
    capsys.readouterr()
    code = main(["--model", str(tmp_path / "model"), "--save", str(tmp_path / "out"), "--calib-data",
                 str(tmp_path / "text.txt"), "--nsamples", "2", "--seqlen", "16"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "shared across layers" in err, err


def test_weights_no_method_prunes_still_count(family_checkpoint, tmp_path):
    """Jamba: the Mamba convolution (3-D) and A_log are weights no method prunes; they are counted as
    `other`, so the total is what was written. dt_proj is read as a weight, never called: it gets no
    calibration input and is pruned by magnitude, and the report says why."""
    folder = family_checkpoint("jamba")
    report = run(folder, tmp_path / "out", "wanda")
    check_same_layout(tmp_path / "out", folder)
    other = {n: m for n, m in report["unpruned"].items() if m["kind"] == "other"}
    assert any(n.endswith("conv1d.weight") for n in other) and any(n.endswith("A_log") for n in other)
    never_fed = [n for n, m in report["modules"].items() if m.get("fallback") == "never fed"]
    assert never_fed and all(n.endswith("dt_proj") for n in never_fed)
    assert report["modules"][never_fed[0]]["sparsity"] == 0.5
    counted = sum(m["numel"] for m in {**report["modules"], **report["unpruned"]}.values())
    written = read_all_tensors(tmp_path / "out")
    in_blocks = sum(t.numel() for n, t in written.items() if ".layers." in n and t.dim() >= 2
                    and not n.endswith("bias") and "norm" not in n)
    assert counted == in_blocks
