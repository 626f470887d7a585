"""NeuronRank statistics against hand computations, module selection, structured neurons, hybrid."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.config import PruneConfig
from offload_prune.methods.neuronrank import ChannelStatistics, NeuronRank
from offload_prune.stream.pipeline import prune

from conftest import read_all_tensors
from test_streaming_matches_in_memory import calibration_windows

# 2 windows ("documents") x 3 tokens x 4 channels
ACTS = torch.tensor([[[1.0, -2.0, 0.0, 4.0], [3.0, 0.0, 0.5, -4.0], [2.0, 2.0, 0.5, 4.0]],
                     [[0.0, -1.0, 0.0, 0.1], [0.0, 1.0, 0.0, 0.1], [0.0, 3.0, 6.0, 0.1]]])


def options(**kw):
    return PruneConfig(model="-", prune_method=kw.pop("prune_method", "neuronrank_tfidf"), **kw).validate()


def hand_quantile(values, q):
    """Linear interpolation between order statistics, as numpy/torch define quantiles."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (position - low)


def test_doc_mode_by_hand():
    stats = ChannelStatistics("doc", options(nr_q_active=0.6))  # the seeds' quantile
    stats.add(ACTS[:1], 0)
    stats.add(ACTS[1:], 0)
    rows = ACTS.tolist()
    tf = [sum(abs(rows[d][t][j]) for d in range(2) for t in range(3)) / 6 for j in range(4)]
    peak = [max(abs(rows[d][t][j]) for d in range(2) for t in range(3)) for j in range(4)]
    strength = [[sum(abs(rows[d][t][j]) for t in range(3)) / 3 for j in range(4)] for d in range(2)]
    tau = hand_quantile([v for row in strength for v in row], 0.60)
    df = [sum(strength[d][j] > tau for d in range(2)) for j in range(4)]
    idf = [math.log(3 / (df[j] + 1)) + 1 for j in range(4)]
    assert stats.tf().tolist() == pytest.approx(tf)
    assert stats.spikiness().tolist() == pytest.approx([peak[j] / tf[j] for j in range(4)])
    assert stats.idf().tolist() == pytest.approx(idf)
    assert len(set(df)) > 1  # channels differ: the threshold is one for the module


def test_input_factor_by_hand():
    """--nr-score input: ||X_j||_2 * IDF_j^gamma, with IDF from the same doc statistics."""
    stats = ChannelStatistics("doc", options(nr_input_idf_exp=0.7))
    stats.add(ACTS, 0)
    norms = [math.sqrt(sum(t[j] ** 2 for d in ACTS.tolist() for t in d)) for j in range(4)]
    expected = [n * float(i) ** 0.7 for n, i in zip(norms, stats.idf())]
    assert stats.input_factor().tolist() == pytest.approx(expected, rel=1e-6)


def test_input_score_at_gamma_zero_is_wanda(checkpoint_factory, tmp_path):
    """|W| * ||X|| * IDF^0 per output row is Wanda's score: the same model, bit for bit; at gamma > 0
    it differs, and every row still loses exactly half its weights."""
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128)
    run(folder, tmp_path / "wanda", prune_method="wanda")
    report = run(folder, tmp_path / "nr0", nr_input_idf_exp=0.0)
    run(folder, tmp_path / "nr1", nr_input_idf_exp=1.0, nr_tfidf_k=4)
    wanda, nr0, nr1 = (read_all_tensors(tmp_path / x) for x in ("wanda", "nr0", "nr1"))
    assert all(torch.equal(wanda[name], nr0[name]) for name in wanda)
    assert any(not torch.equal(wanda[name], nr1[name]) for name in wanda)
    for name, tensor in nr1.items():
        if name.endswith("proj.weight"):
            assert bool(((tensor == 0).sum(dim=1) == tensor.shape[1] // 2).all()), name
    assert {m["rule"] for m in report["modules"].values()} == {"neuronrank_tfidf(topic, input)"}


def test_old_mode_by_hand():
    stats = ChannelStatistics("old", options(prune_method="neuronrank_old"))
    stats.add(ACTS, 0)
    positive = [sum(v > 0 for d in ACTS.tolist() for t in d for v in [t[j]]) for j in range(4)]
    assert stats.idf().tolist() == pytest.approx([math.log(7 / (p + 1)) + 1 for p in positive])


def test_scores_broadcast_along_the_neuron_axis():
    config = options(weight_exp=2.0, tf_exp=1.0, idf_exp=0.5, nr_spikiness_exp=0.0, nr_score="neuron")
    method = NeuronRank(config)
    weight = torch.randn(4, 3)
    factor = torch.tensor([1.0, 2.0, 3.0, 4.0])
    everything, some = slice(None), slice(1, 3)  # scores come a slice of rows at a time
    rows = method._scorer(weight, factor, axis=0)  # gate/up: neuron j is row j
    assert torch.allclose(rows(everything), weight.abs() ** 2 * factor[:, None])
    assert torch.allclose(rows(some), (weight.abs() ** 2 * factor[:, None])[some])
    cols = method._scorer(weight.T.contiguous(), factor, axis=1)  # down: neuron j is column j
    assert torch.allclose(cols(everything), weight.T.abs() ** 2 * factor[None, :])
    old = NeuronRank(options(prune_method="neuronrank_old"))
    assert torch.allclose(old._scorer(weight, factor, axis=0)(some),
                          (weight.norm(dim=1, keepdim=True) * factor[:, None] * torch.ones(1, 3))[some])
    # a column neuron's norm spans all rows, also those outside the slice being scored
    assert torch.allclose(old._scorer(weight.T.contiguous(), factor, axis=1)(slice(0, 1)),
                          weight.T.norm(dim=0, keepdim=True) * factor[None, :])


@pytest.fixture(scope="module")
def block0_down_inputs(checkpoint_factory):
    """Real activations: what down_proj of block 0 of a small model receives on 8 windows."""
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    windows = calibration_windows(folder)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    return torch.cat(seen)


def test_idf_varies_on_real_activations_where_the_degenerate_definition_is_constant(block0_down_inputs):
    stats = ChannelStatistics("doc", options())
    stats.add(block0_down_inputs, 0)
    idf = stats.idf()
    assert idf.unique().numel() > 3 and float(idf.std()) > 0.05
    # The public code's definition: a channel is active in a document when any token exceeds the
    # channel's own 60% quantile -- true for every channel and document, so IDF is one constant.
    a = block0_down_inputs.abs()
    per_channel = torch.quantile(a.reshape(-1, a.shape[-1]), 0.6, dim=0)
    degenerate_df = (a > per_channel).any(dim=1).sum(dim=0)
    assert torch.unique(torch.log((len(a) + 1) / (degenerate_df + 1.0)) + 1).numel() == 1


def test_topic_mode_is_seeded_handles_empty_topics_and_varies(block0_down_inputs):
    idfs = []
    for seed in (0, 0, 1):
        stats = ChannelStatistics("topic", options(nr_tfidf_mode="topic", nr_tfidf_k=64, seed=seed))
        stats.add(block0_down_inputs, 0)
        stats.end_pass(0)
        stats.add(block0_down_inputs, 1)
        idfs.append(stats.idf())
    assert torch.equal(idfs[0], idfs[1]) and not torch.equal(idfs[0], idfs[2])
    assert float(idfs[0].std()) > 0.05
    # 10 identical tokens, 8 topics: 7 stay empty, and N counts only the one that is not
    same = torch.ones(1, 10, 4)
    stats = ChannelStatistics("topic", options(nr_tfidf_mode="topic", nr_tfidf_k=8))
    stats.add(same, 0)
    stats.end_pass(0)
    stats.add(same, 1)
    assert len(stats.topic_counts) == 8 and int((stats.topic_counts > 0).sum()) == 1
    assert torch.isfinite(stats.idf()).all()


def run(folder, save, **kw):
    return prune(PruneConfig(model=str(folder), save=save, calib_data=str(folder / "demo.txt"), nsamples=6, seqlen=32,
                             quiet=True, **{"prune_method": "neuronrank_tfidf", **kw}))


MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@pytest.mark.parametrize("flags, layers, kinds, head", [
    ({}, range(4), ATTENTION + MLP, False),
    ({"nr_include_attention": False}, range(4), MLP, False),
    ({"nr_prune_lm_head": True}, range(4), ATTENTION + MLP, True),
    ({"pruning_last": 2}, range(2, 4), MLP, False),
    ({"pruning_last": 2, "nr_include_attention": True, "nr_prune_lm_head": True}, range(2, 4), MLP, True),
])
def test_module_selection(checkpoint_factory, tmp_path, flags, layers, kinds, head):
    folder = checkpoint_factory(num_layers=4, hidden=64, intermediate=128)
    report = run(folder, tmp_path / "out", **flags)
    expected = {f"model.layers.{i}.{k}" for i in layers for k in kinds} | ({"lm_head.weight"} if head else set())
    assert set(report["modules"]) == expected
    written, original = read_all_tensors(tmp_path / "out"), read_all_tensors(folder)
    for name, tensor in written.items():
        pruned = name.removesuffix(".weight") in expected or name in expected
        assert torch.equal(tensor, original[name]) != pruned, name
    # The totals are those of the written tensors: every weight matrix in the blocks, pruned or not
    # (and the head when it was pruned), so pruning a part can never read as the whole at 50 %.
    counted = [t for n, t in written.items() if (n.startswith("model.layers.") and t.dim() >= 2)
               or (head and n == "lm_head.weight")]
    assert report["totals"]["all"]["numel"] == sum(t.numel() for t in counted)
    assert report["totals"]["all"]["zeros"] == sum(int((t == 0).sum()) for t in counted)
    assert (report["totals"]["all"]["sparsity"] < 0.45) == (set(kinds) != set(ATTENTION + MLP) or len(layers) < 4)


def test_tied_lm_head_is_untied_and_pruned(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128, tie_word_embeddings=True)
    run(folder, tmp_path / "out", nr_prune_lm_head=True, prune_method="wanda")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    embedding = read_all_tensors(folder)["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert int((model.lm_head.weight == 0).sum()) == embedding.numel() // 2


def test_structured_removes_whole_neurons_and_the_model_runs(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128)
    report = run(folder, tmp_path / "out", prune_method="neuronrank_old", sparsity_type="structured")
    assert set(report["modules"]) == {f"model.layers.{i}.{k}" for i in range(2) for k in MLP}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for layer in model.model.layers:
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        removed = (gate == 0).all(dim=1)
        assert int(removed.sum()) == 64
        assert torch.equal(removed, (up == 0).all(dim=1)) and torch.equal(removed, (down == 0).all(dim=0))
        assert not (gate[~removed] == 0).all(dim=1).any()
    with torch.no_grad():
        assert torch.isfinite(model(calibration_windows(folder)[:1]).logits).all()


@pytest.mark.parametrize("mlp_method", ["neuronrank_tfidf", "neuronrank_old"])
def test_hybrid_is_wanda_on_attention_and_neuronrank_on_mlp(checkpoint_factory, tmp_path, mlp_method):
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128)
    hybrid = run(folder, tmp_path / "hybrid", prune_method="hybrid", hybrid_mlp_method=mlp_method)
    run(folder, tmp_path / "wanda", prune_method="wanda")
    run(folder, tmp_path / "nr", prune_method=mlp_method)
    h, w, n = (read_all_tensors(tmp_path / x) for x in ("hybrid", "wanda", "nr"))
    # Block 0 sees the same inputs in all three runs (later blocks see differently pruned inputs).
    for kind in ATTENTION:
        name = f"model.layers.0.{kind}.weight"
        assert torch.equal(h[name] == 0, w[name] == 0), name
    for kind in MLP:
        name = f"model.layers.0.{kind}.weight"
        assert torch.equal(h[name] == 0, n[name] == 0), name
    rules = {m["rule"] for m in hybrid["modules"].values()}
    assert rules == {"wanda", "neuronrank_old" if mlp_method == "neuronrank_old" else "neuronrank_tfidf(topic, input)"}
