"""Per-block sparsity: OWL's ratios (against the paper's formula and an independent whole-model
outlier count), exact totals, and the refusals."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.config import OffloadPruneError, PruneConfig
from offload_prune.stream.report import format_summary
from offload_prune.surgery.layer_sparsity import OutlierCounter, owl_ratios, ratios_from_file

from conftest import read_all_tensors
from reference import catch_layer0_inputs, prune_in_memory
from test_streaming_matches_in_memory import calibration_windows, run_streamed


def test_owl_ratios_follow_the_paper_and_keep_the_mean():
    # Outlier ratios 1, 2, 3: scaled to 0, lambda, 2 lambda, mean lambda -> S + lambda, S, S - lambda.
    assert owl_ratios([1.0, 2.0, 3.0], [10, 10, 10], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)
    # Skewed ratios: the paper's shift would put a block beyond lambda; clipping and re-centring keep both rules.
    ratios = owl_ratios([0.0, 0.0, 0.0, 10.0], [1, 1, 1, 1], 0.5, 0.1)
    assert all(0.4 - 1e-12 <= r <= 0.6 + 1e-12 for r in ratios)
    assert sum(ratios) / 4 == pytest.approx(0.5, abs=1e-12)
    assert ratios[3] == min(ratios)  # most outliers: pruned least
    # Blocks of different sizes: the weighted mean is the target.
    sizes = [100, 300, 600]
    ratios = owl_ratios([3.0, 1.0, 2.0], sizes, 0.6, 0.05)
    assert sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-12)
    assert owl_ratios([2.0, 2.0], [5, 5], 0.5, 0.1) == pytest.approx([0.5, 0.5])


def test_outlier_ratio_counts_scores_above_m_times_the_block_mean():
    torch.manual_seed(0)
    matrices = {"a": torch.nn.Linear(16, 8), "b": torch.nn.Linear(16, 4)}
    inputs = {name: torch.randn(2, 5, 16) * torch.rand(16) * 4 for name in matrices}
    counter = OutlierCounter()
    for name, x in inputs.items():
        for part in x:  # two micro-batches
            counter.add_batch(name, part, None)
    scores = torch.cat([(m.weight.abs() * inputs[n].reshape(-1, 16).pow(2).sum(0).sqrt()).flatten()
                        for n, m in matrices.items()])
    ratio, count = counter.outlier_ratio(matrices, 2.0)
    assert count == scores.numel()
    assert ratio == int((scores > 2.0 * scores.mean()).sum()) / scores.numel()


@torch.no_grad()
def dense_outlier_ratios(folder, windows, m):
    """Whole model, dense forward, each layer's Wanda scores with its dense inputs."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, (args, kwargs) = catch_layer0_inputs(model, windows)
    ratios = []
    for layer in model.model.layers:
        linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
        seen = {n: [] for n in linears}
        hooks = [mod.register_forward_hook(lambda _, a, out, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, mod in linears.items()]
        inputs = [layer(x, *args, **kwargs) for x in inputs]
        inputs = [out[0] if isinstance(out, tuple) else out for out in inputs]
        for h in hooks:
            h.remove()
        scores = torch.cat([(mod.weight.abs() * torch.cat(seen[n]).double().pow(2).sum(0).sqrt().float()).flatten()
                            for n, mod in linears.items()])
        ratios.append(float((scores > m * scores.double().mean()).sum()) / scores.numel())
    return ratios


def test_owl_run_prunes_each_block_to_its_measured_ratio(checkpoint_factory, tmp_path):
    folder = checkpoint_factory(arch="llama", num_layers=4, hidden=64, intermediate=128)
    report = run_streamed(folder, tmp_path / "out", "wanda", "unstructured", layer_sparsity="owl", owl_m=3.0,
                          owl_lambda=0.1)
    windows = calibration_windows(folder)
    expected_outliers = dense_outlier_ratios(folder, windows, 3.0)
    layers = report["layer_sparsity"]
    assert layers["rule"] == "owl"
    assert layers["outlier_ratios"] == pytest.approx(expected_outliers, rel=1e-6)
    assert len(set(layers["ratios"])) > 1
    assert sum(layers["ratios"]) / 4 == pytest.approx(0.5, abs=1e-12)
    assert all(0.4 - 1e-12 <= r <= 0.6 + 1e-12 for r in layers["ratios"])
    # The weights are whole-model Wanda with those ratios, bit for bit.
    reference = prune_in_memory(folder, windows, "wanda", layers["ratios"], None).state_dict()
    for name, tensor in read_all_tensors(tmp_path / "out").items():
        assert torch.equal(tensor, reference[name]), name
    # Total: the target, less at most one weight per row lost to rounding each block's count.
    total = report["totals"]["all"]
    rows = sum(m["shape"][0] for m in report["modules"].values())
    assert 0 <= 0.5 * total["numel"] - total["zeros"] <= rows
    assert "layer sparsity (owl)" in format_summary(report)


@pytest.mark.parametrize("options, message", [
    (dict(layer_sparsity="owl", sparsity_type="2:4"), "needs unstructured sparsity"),
    (dict(layer_sparsity="owl", sparsity_ratio=0.95, owl_lambda=0.08), "must stay in [0, 1)"),
    (dict(layer_sparsity="nowhere.json"), "is none of them"),
    (dict(prune_method="wanda", ria_permute=True), "--ria-permute"),
])
def test_refusals(options, message):
    with pytest.raises(OffloadPruneError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        PruneConfig(model="-", **options).validate()


def test_ratio_file_refusals(tmp_path):
    path = tmp_path / "r.json"
    for content, message in (([0.5, 0.5], "2 ratios for a model of 3 blocks"), ([0.5, 1.0, 0.5], "block 1's ratio 1.0"),
                             ({"x": 1}, "expected a JSON list")):
        path.write_text(json.dumps(content))
        with pytest.raises(OffloadPruneError, match=message):
            ratios_from_file(str(path), 3)
    path.write_text("{not json")
    with pytest.raises(OffloadPruneError, match="not a readable JSON file"):
        ratios_from_file(str(path), 3)
