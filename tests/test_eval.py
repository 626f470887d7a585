"""Streamed perplexity equals the whole-model computation done the SparseGPT/Wanda way."""
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offload_prune.data.calibration import eval_windows, load_text, tokenize

from conftest import run_cli


def in_memory_ppl(folder, seqlen, max_windows, text_file=None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenize(AutoTokenizer.from_pretrained(folder), load_text(str(text_file or folder / "demo.txt")))
    windows = eval_windows(ids, seqlen, max_windows)
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1]
            nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item() * seqlen)
    return math.exp(sum(nlls) / (len(windows) * seqlen))


def test_eval_command_matches_in_memory(checkpoint_factory):
    folder = checkpoint_factory(num_layers=3, hidden=64, intermediate=128, tie_word_embeddings=True)
    result = run_cli("eval", "--model", folder, "--eval-data", folder / "demo.txt", "--seqlen", 48,
                     "--eval-max-windows", 5, "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    streamed = json.loads(result.stdout)
    assert streamed["windows"] == 5
    assert math.isclose(streamed["ppl"], in_memory_ppl(folder, 48, 5), rel_tol=1e-5)


def test_prune_reports_dense_and_pruned_perplexity(tiny_llama, tmp_path):
    save = tmp_path / "out"
    result = run_cli("--model", tiny_llama, "--save", save, "--calib-data", tiny_llama / "demo.txt",
                     "--nsamples", 4, "--seqlen", 32, "--eval-ppl", "--eval-data", tiny_llama / "demo.txt",
                     "--eval-max-windows", 4)
    assert result.returncode == 0, result.stderr
    assert "perplexity dense" in result.stdout and "perplexity pruned" in result.stdout
    report = json.loads((save / "report.json").read_text())
    ppl = report["perplexity"]
    assert math.isclose(ppl["dense"]["ppl"], in_memory_ppl(tiny_llama, 32, 4), rel_tol=1e-5)
    assert math.isclose(ppl["pruned"]["ppl"], in_memory_ppl(save, 32, 4), rel_tol=1e-5)
    assert ppl["pruned"]["ppl"] != ppl["dense"]["ppl"]
    assert {"eval_dense", "eval_pruned"} <= set(report["seconds"])
    assert report["evaluation_data"] == str(tiny_llama / "demo.txt")  # how to reproduce it
