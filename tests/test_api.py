"""The Python API, and the rough edges a new user met: each refused in one line, exit 2, nothing written."""
import fcntl
import json
import os
import time

import pytest
import torch

import offload_prune
from offload_prune.cli import main
from offload_prune.basics import format_bytes

from conftest import run_cli


def test_prune_plan_and_perplexity_from_python_with_plain_strings(tiny_llama, tmp_path):
    save = str(tmp_path / "out")
    report = offload_prune.prune(str(tiny_llama), save, calib_data=str(tiny_llama / "demo.txt"), nsamples=4,
                                 seqlen=64, quiet=True)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["all"]["sparsity"] == 0.5
    assert report["calibration"] == {"data": str(tiny_llama / "demo.txt"), "nsamples": 4, "seqlen": 64, "seed": 0}
    assert report["versions"]["torch"] == torch.__version__
    plan = offload_prune.plan(str(tiny_llama), nsamples=4, seqlen=64, calib_data=str(tiny_llama / "demo.txt"))
    assert plan["activation_cache_bytes"] == report["memory_plan"]["activation_cache_bytes"]
    dense = offload_prune.perplexity(tiny_llama, tiny_llama / "demo.txt", seqlen=64, max_windows=2)
    pruned = offload_prune.perplexity(save, str(tiny_llama / "demo.txt"), seqlen=64, max_windows=2)
    assert dense["windows"] == pruned["windows"] == 2 and dense["ppl"] != pruned["ppl"]


def test_python_options_are_validated_as_the_cli_validates_them(tiny_llama, tmp_path):
    with pytest.raises(offload_prune.OffloadPruneError, match="unknown option 'sparsity_ratoi'"):
        offload_prune.prune(tiny_llama, tmp_path / "o", sparsity_ratoi=0.3)
    with pytest.raises(offload_prune.OffloadPruneError, match=r"\[0, 1\)"):
        offload_prune.prune(tiny_llama, tmp_path / "o", sparsity_ratio=1.5)
    with pytest.raises(offload_prune.OffloadPruneError, match="over --max-host-memory 1.00 MiB"):
        offload_prune.prune(tiny_llama, tmp_path / "o", calib_data=str(tiny_llama / "demo.txt"), nsamples=4,
                            seqlen=64, max_host_memory="1MiB", quiet=True)
    assert not (tmp_path / "o").exists()


def one_line_refusal(capsys, *args) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("offload-prune: error: "), err
    return err


def quick(model, save, *extra):
    return ["--model", model, "--save", save, "--calib-data", model / "demo.txt", "--nsamples", 2, "--seqlen", 16,
            "--quiet", *extra]


def test_text_that_is_not_utf8_is_one_line(capsys, tiny_llama, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 50)
    assert "not UTF-8 text" in one_line_refusal(capsys, *quick(tiny_llama, tmp_path / "o")[:4], "--calib-data", latin)
    assert "not UTF-8 text" in one_line_refusal(capsys, *quick(tiny_llama, tmp_path / "o"), "--eval-ppl",
                                                "--eval-data", latin)
    assert not (tmp_path / "o").exists()


def test_save_under_a_file_is_one_line(capsys, tiny_llama, tmp_path):
    (tmp_path / "file").write_text("mine")
    assert "is a file, so no folder" in one_line_refusal(capsys, *quick(tiny_llama, tmp_path / "file" / "sub" / "o"))
    assert (tmp_path / "file").read_text() == "mine"


def test_a_folder_in_use_is_refused_before_anything_heavy(tiny_llama, tmp_path):
    save = tmp_path / "busy"
    save.mkdir()
    fd = os.open(save, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
    try:
        (save / "keep").write_text("theirs")
        log = tmp_path / "steps.log"
        result = run_cli(*quick(tiny_llama, save), env_extra={"OFFLOAD_PRUNE_STEP_LOG": str(log)})
    finally:
        os.close(fd)
    assert result.returncode == 2 and "in use by another offload-prune process" in result.stderr
    assert "calibration" not in result.stderr and not log.exists()  # refused before any step or calibration
    assert sorted(p.name for p in save.iterdir()) == ["keep"]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"offload-prune {offload_prune.__version__}"


@pytest.mark.parametrize("flags, words", [
    (["--prune_method", "neuronrank_tfidf", "--idf-exp", "1.5"], "--idf-exp is not read by the input score"),
    (["--prune_method", "neuronrank_tfidf", "--nr-score", "neuron", "--nr-input-idf-exp", "0.5"],
     "--nr-input-idf-exp is the input score's"),
])
def test_a_flag_the_chosen_score_ignores_is_refused(capsys, tiny_llama, tmp_path, flags, words):
    assert words in one_line_refusal(capsys, *quick(tiny_llama, tmp_path / "o"), *flags)
    assert not (tmp_path / "o").exists()


def test_eval_prints_a_readable_line_and_json_on_request(tiny_llama):
    args = ["eval", "--model", tiny_llama, "--eval-data", tiny_llama / "demo.txt", "--seqlen", 32,
            "--eval-max-windows", 2, "--quiet"]
    readable = run_cli(*args)
    assert readable.returncode == 0 and "perplexity" in readable.stdout and "{" not in readable.stdout
    as_json = json.loads(run_cli(*args, "--json").stdout)
    assert as_json["windows"] == 2 and f"{as_json['ppl']:.3f}" in readable.stdout


def test_memory_prints_in_human_units():
    assert [format_bytes(n) for n in (512, 3 * 2**10, 5 * 2**20 // 2, 2**30 + 2**29, None)] == \
        ["512 B", "3.00 KiB", "2.50 MiB", "1.50 GiB", "-"]


def test_the_lock_check_is_quick(tiny_llama, tmp_path):
    """The early refusal costs config and shard headers only: well under the 12-22 s it took at the lock."""
    save = tmp_path / "busy"
    save.mkdir()
    fd = os.open(save, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        started = time.perf_counter()
        with pytest.raises(offload_prune.OffloadPruneError, match="in use"):
            offload_prune.prune(tiny_llama, save, calib_data=str(tiny_llama / "demo.txt"), nsamples=2, seqlen=16)
        assert time.perf_counter() - started < 5
    finally:
        os.close(fd)


def test_the_summary_says_what_a_structured_run_removed_and_why_owl_falls_short(tiny_llama, tmp_path):
    flags = ["--model", tiny_llama, "--calib-data", tiny_llama / "demo.txt", "--nsamples", 4, "--seqlen", 64]
    structured = run_cli(*flags, "--save", tmp_path / "s", "--sparsity_type", "structured", "--prune_method", "flap",
                         "--shrink")
    assert structured.returncode == 0, structured.stderr
    report = json.loads((tmp_path / "s" / "report.json").read_text())["structured"]
    before, after = report["params_before"], report["params_after"]
    assert f"parameters: {before:,} -> {after:,}" in structured.stdout
    width, kept = report["widths"][0]
    assert f"MLP neurons per layer: {width} -> {kept}, removed" in structured.stdout
    assert "target sparsity" not in structured.stdout and "sparsity\n" not in structured.stdout
    owl = run_cli(*flags, "--save", tmp_path / "o", "--layer-sparsity", "owl")
    totals = json.loads((tmp_path / "o" / "report.json").read_text())["totals"]["all"]
    assert totals["sparsity"] < 0.4995
    assert f"reached {totals['sparsity']:.2%} of the pruned matrices' weights against the 50.00% target" in owl.stdout
    assert "rounded down" in owl.stdout


def test_plan_says_the_host_peak_the_runs_own_plan_says(tiny_llama, tmp_path):
    """Both measure the process at the same point (tokenizer, calibration windows and meta model made):
    one number, where the constant baseline said 0.54 GiB against the run's 0.44."""
    flags = ["--model", tiny_llama, "--calib-data", tiny_llama / "demo.txt", "--nsamples", 8, "--seqlen", 64]
    planned = run_cli("plan", *flags)
    assert planned.returncode == 0, planned.stderr
    line = next(line for line in planned.stdout.splitlines() if line.strip().startswith("host"))
    value, unit = line.split("peak")[1].split()[:2]
    plan_bytes = float(value) * {"GiB": 2**30, "MiB": 2**20}[unit]
    assert run_cli(*flags, "--save", tmp_path / "o", "--quiet").returncode == 0
    run_plan = json.loads((tmp_path / "o" / "report.json").read_text())["memory_plan"]["host"]["peak"]
    assert abs(plan_bytes / run_plan - 1) < 0.05, (plan_bytes, run_plan)
