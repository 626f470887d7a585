"""Streamed pruning gives bit-identical weights to whole-model pruning, on four architectures."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offload_prune.data.calibration import load_text, sample_windows, tokenize
from offload_prune.config import PruneConfig
from offload_prune.stream.pipeline import prune

from conftest import read_all_tensors
from reference import prune_in_memory

NSAMPLES, SEQLEN = 6, 32
ARCH_EXTRA = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}}


def calibration_windows(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return sample_windows(tokenize(tokenizer, load_text(str(folder / "demo.txt"))), NSAMPLES, SEQLEN, 0)


def run_streamed(folder, save, method, sparsity_type, **extra):
    config = PruneConfig(model=str(folder), save=save, prune_method=method, sparsity_ratio=0.5,
                         sparsity_type=sparsity_type, calib_data=str(folder / "demo.txt"),
                         nsamples=NSAMPLES, seqlen=SEQLEN, quiet=True, **extra)
    return prune(config)


@pytest.mark.parametrize("arch", list(ARCH_EXTRA))
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_streamed_equals_in_memory(checkpoint_factory, tmp_path, arch, method, sparsity_type):
    folder = checkpoint_factory(arch=arch, num_layers=3, hidden=64, intermediate=128, **ARCH_EXTRA[arch])
    save = tmp_path / "out"
    report = run_streamed(folder, save, method, sparsity_type)

    nm = (2, 4) if sparsity_type == "2:4" else None
    reference = prune_in_memory(folder, calibration_windows(folder), method, 0.5, nm)
    expected = reference.state_dict()
    written = read_all_tensors(save)
    original = read_all_tensors(folder)
    assert set(written) == set(original)
    for name, tensor in written.items():
        assert tensor.dtype == original[name].dtype and tensor.shape == original[name].shape, name
        assert torch.equal(tensor, expected[name]), f"{name} differs from the in-memory result"
        if name.endswith("proj.weight"):
            zeros = (tensor == 0).reshape(-1, 4).sum(1) if nm else None
            if nm:
                assert bool((zeros >= 2).all()), f"{name}: a group of 4 has fewer than 2 zeros"
            if method == "wanda" or nm:  # per-row count: exact in every row
                assert bool(((tensor == 0).sum(1) == tensor.shape[1] // 2).all()), name
            else:
                assert int((tensor == 0).sum()) == tensor.numel() // 2, name
        else:  # not pruned: copied bit-exactly
            assert torch.equal(tensor, original[name]), name
    assert report["totals"]["all"]["sparsity"] == 0.5
    if nm:
        assert report["nm_valid"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32).eval()
    ids = calibration_windows(folder)[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_output_layout(tiny_llama, tmp_path):
    save = tmp_path / "out"
    run_streamed(tiny_llama, save, "wanda", "unstructured")
    index = json.loads((save / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in save.glob("*.safetensors")}
    largest_input = max(p.stat().st_size for p in tiny_llama.glob("*.safetensors"))
    assert max(p.stat().st_size for p in save.glob("*.safetensors")) <= largest_input
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (save / side).read_bytes() == (tiny_llama / side).read_bytes()
    # Only the finished manifest stays behind (activations and layer arguments are gone); it names
    # every output file with its size and checksum.
    assert [p.name for p in (save / ".offload-prune-run").iterdir()] == ["manifest.json"]
    manifest = json.loads((save / ".offload-prune-run" / "manifest.json").read_text())
    assert manifest["finished"] and manifest["run_files"] == {}
    written = {p.name: p.stat().st_size for p in save.iterdir() if p.is_file()}
    assert {name: record["size"] for name, record in manifest["outputs"].items()} == written
    report = json.loads((save / "report.json").read_text())
    assert {"calibration", "capture", "prune", "write"} <= set(report["seconds"])
    assert report["peak_host_rss_bytes"] > 0
    assert len(report["modules"]) == 3 * 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_keeps_dtype_and_unpruned_bits(checkpoint_factory, tmp_path, dtype):
    folder = checkpoint_factory(num_layers=2, hidden=64, intermediate=128, dtype=dtype, tie_word_embeddings=True)
    save = tmp_path / "out"
    run_streamed(folder, save, "wanda", "unstructured")
    written, original = read_all_tensors(save), read_all_tensors(folder)
    assert "lm_head.weight" not in written  # tied: still tied
    for name, tensor in written.items():
        assert tensor.dtype == dtype
        kept = tensor != 0
        assert torch.equal(tensor[kept], original[name][kept]), f"{name}: a kept weight changed"
    AutoModelForCausalLM.from_pretrained(save)


def test_disk_offload_and_micro_batches_give_the_same_model(tiny_llama, tmp_path):
    run_streamed(tiny_llama, tmp_path / "ram", "wanda", "unstructured")
    run_streamed(tiny_llama, tmp_path / "disk", "wanda", "unstructured", offload_activations="disk")
    ram, disk = read_all_tensors(tmp_path / "ram"), read_all_tensors(tmp_path / "disk")
    assert all(torch.equal(ram[n], disk[n]) for n in ram)


def _compare_to_reference(folder, save, method, sparsity, nm):
    reference = prune_in_memory(folder, calibration_windows(folder), method, sparsity, nm)
    expected, written = reference.state_dict(), read_all_tensors(save)
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name]), f"{name} differs from the in-memory result"
    return written


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_ria_streamed_equals_in_memory(checkpoint_factory, tmp_path, sparsity_type):
    folder = checkpoint_factory(arch="llama", num_layers=3, hidden=64, intermediate=128)
    report = run_streamed(folder, tmp_path / "out", "ria", sparsity_type)
    nm = (2, 4) if sparsity_type == "2:4" else None
    _compare_to_reference(folder, tmp_path / "out", "ria", 0.5, nm)
    assert report["totals"]["all"]["sparsity"] == 0.5


def test_layer_sparsity_file_gives_each_block_its_ratio(checkpoint_factory, tmp_path):
    """Ratios from a JSON file: each block pruned to its own ratio, bit-identical to whole-model Wanda
    with those ratios; a report.json of the run gives the same ratios back."""
    folder = checkpoint_factory(arch="llama", num_layers=3, hidden=64, intermediate=128)
    ratios = [0.25, 0.5, 0.75]
    (tmp_path / "ratios.json").write_text(json.dumps(ratios))
    report = run_streamed(folder, tmp_path / "out", "wanda", "unstructured", layer_sparsity=str(tmp_path / "ratios.json"))
    written = _compare_to_reference(folder, tmp_path / "out", "wanda", ratios, None)
    for i, ratio in enumerate(ratios):
        down = written[f"model.layers.{i}.mlp.down_proj.weight"]
        assert int((down == 0).sum()) == int(down.shape[1] * ratio) * down.shape[0]
    assert report["layer_sparsity"] == {"rule": "file", "ratios": ratios}
    assert report["totals"]["all"]["sparsity"] == pytest.approx(0.5)
    again = run_streamed(folder, tmp_path / "again", "wanda", "unstructured", layer_sparsity=str(tmp_path / "out" / "report.json"))
    assert again["layer_sparsity"]["ratios"] == ratios
