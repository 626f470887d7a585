"""Mixture-of-Experts blocks streamed expert group by expert group (--expert-group-size): the same bytes
as whole blocks, resumed without redoing a committed group, every kill point resumed identically, and
the refusals."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_prune.cli import main
from offload_prune.config import PruneConfig
from offload_prune.stream.pipeline import prune

from conftest import CrashWorker, folder_digests, read_all_tensors
from families import build_family
from test_resume import every, swept_identical

NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family(tmp_path_factory.mktemp(name), name)
        return built[name]
    return get


def run(folder, save, method, **extra):
    return prune(PruneConfig(model=str(folder), save=save, prune_method=method, sparsity_ratio=0.5,
                             calib_data=str(folder / "demo.txt"), nsamples=NSAMPLES, seqlen=SEQLEN, quiet=True,
                             expert_min_tokens=1, **extra))


@pytest.mark.parametrize("name, method, extra, sizes", [
    ("deepseek_v3", "wanda", {}, (3, 1)),
    ("deepseek_v3", "sparsegpt", {}, (3,)),
    ("qwen2_moe", "sparsegpt", {"true_sequential": True}, (2,)),
    ("mixtral", "admm", {}, (2,)),
    ("qwen3_moe", "ria", {}, (3,)),
    ("olmoe", "neuronrank_tfidf", {}, (1,)),
    ("deepseek_v3", "sparsegpt", {"sparsity_type": "2:4"}, (3,)),
    ("qwen2_moe", "hybrid", {}, (2,)),
    ("deepseek_v3", "wanda", {"sparsity_type": "structured"}, (3,)),
    ("qwen2_moe", "flap", {"sparsity_type": "structured"}, (2,)),
])
def test_expert_groups_write_the_bytes_of_whole_blocks(family, tmp_path, name, method, extra, sizes):
    """Each group's statistics come from the experts' recorded inputs and the block's outputs from every group
    streamed in again: the written tensors equal the whole-block run's bit for bit (the next blocks' pruning
    depends on those outputs), in other shards; the report says the same per matrix; transformers loads it."""
    folder = family(name)
    whole = run(folder, tmp_path / "whole", method, **extra)
    expected = read_all_tensors(tmp_path / "whole")
    for size in sizes:
        report = run(folder, tmp_path / f"groups-{size}", method, expert_group_size=size, **extra)
        written = read_all_tensors(tmp_path / f"groups-{size}")
        assert set(written) == set(expected)
        differing = [n for n in expected if not torch.equal(written[n], expected[n])]
        assert not differing, f"group size {size}: {differing[:3]}"
        assert report["modules"].keys() == whole["modules"].keys()
        for module, entry in whole["modules"].items():
            assert report["modules"][module]["zeros"] == entry["zeros"], module
            assert report["modules"][module].get("routed_tokens") == entry.get("routed_tokens"), module
        assert report["totals"] == whole["totals"]
        files = set(json.loads((tmp_path / f"groups-{size}" / "model.safetensors.index.json").read_text())
                    ["weight_map"].values())
        assert len(files) > len(set(json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())
                                    ["weight_map"].values()))
    AutoModelForCausalLM.from_pretrained(tmp_path / f"groups-{sizes[0]}")


@pytest.fixture(scope="module")
def grouped_args(family):
    folder = family("deepseek_v3")

    def args(save, *extra, size=2):
        return ["--model", folder, "--save", save, "--prune_method", "wanda", "--calib-data", folder / "demo.txt",
                "--nsamples", NSAMPLES, "--seqlen", SEQLEN, "--quiet", "--expert-min-tokens", 1,
                "--expert-group-size", size, *extra]
    return args


@pytest.fixture(scope="module")
def worker(grouped_args, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    crash_worker = CrashWorker(grouped_args(folder / "warm-up"), folder)
    yield crash_worker
    crash_worker.close()


def test_a_committed_group_is_not_redone(grouped_args, worker, tmp_path):
    """Killed after block 1's second group is committed: the resumed run (asked for `auto`) writes neither of its
    first two groups again, only the rest, and ends with the uninterrupted run's files."""
    code, printed = worker.run(*grouped_args(tmp_path / "uninterrupted"))
    assert code == 0, printed
    index = json.loads((tmp_path / "uninterrupted" / "model.safetensors.index.json").read_text())["weight_map"]
    group_files = [index[f"model.layers.1.mlp.experts.{first}.down_proj.weight"] for first in (0, 2, 4, 6)]
    steps = worker.steps(*grouped_args(tmp_path / "logged"))
    second_group = next(k for k, step in enumerate(steps) if step.startswith("rename") and group_files[1] in step)
    manifest = next(k for k in range(second_group, len(steps)) if "manifest" in steps[k] and steps[k].startswith("rename"))
    save = tmp_path / "killed"
    code, _ = worker.run(*grouped_args(save), env={"OFFLOAD_PRUNE_KILL_AT_STEP": str(manifest + 2)})
    assert code == -9
    log = tmp_path / "resumed.log"
    # auto would choose whole blocks here (no budget): a resumed run keeps the groups it started with.
    code, printed = worker.run(*grouped_args(save, size="auto"), env={"OFFLOAD_PRUNE_STEP_LOG": str(log)})
    assert code == 0, printed
    written = [line.split(" ", 2)[2] for line in log.read_text().splitlines() if line.split(" ")[1] == "rename"]
    assert not any(group_files[0] in path or group_files[1] in path for path in written)
    assert any(group_files[2] in path for path in written) and any(group_files[3] in path for path in written)
    assert folder_digests(save) == folder_digests(tmp_path / "uninterrupted")


def test_grouped_run_killed_at_every_few_steps_then_resumed_is_identical(grouped_args, worker, tmp_path):
    """The kill sweep on a run in expert groups of 2: every third step and all of the last twelve."""
    steps = swept_identical(worker, grouped_args, tmp_path, "expert groups", every(3))
    assert sum("manifest" in s and s.startswith("rename") for s in steps) > 10  # groups commit on their own


@pytest.mark.parametrize("flag, words", [
    (["--expert-group-size", "0"], "--expert-group-size must be auto or a number >= 1"),
    (["--expert-group-size", "9"], "more than the 8 experts of block 1"),
    (["--expert-group-size", "2", "--layer-sparsity", "owl"], "does not run with --layer-sparsity owl"),
    (["--max-host-memory", "300MiB"], "even one expert at a time needs"),
])
def test_bad_group_sizes_and_budgets_are_refused_in_one_line(family, tmp_path, capsys, flag, words):
    folder = family("deepseek_v3")
    save = tmp_path / "out"
    code = main(["--model", str(folder), "--save", str(save), "--prune_method", "wanda", "--calib-data",
                 str(folder / "demo.txt"), "--nsamples", "4", "--seqlen", "32", "--quiet", *flag])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not save.exists() or not any(save.glob("*.safetensors"))


def test_experts_stored_fused_are_refused(family, tmp_path, capsys):
    folder = family("gpt_oss")
    code = main(["--model", str(folder), "--save", str(tmp_path / "out"), "--calib-data", str(folder / "demo.txt"),
                 "--nsamples", "4", "--seqlen", "32", "--quiet", "--expert-group-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "fused in one tensor: expert groups need one checkpoint tensor per expert" in err, err


def test_fp8_experts_stream_in_groups_and_are_written_back_as_fp8(family, tmp_path):
    """DeepSeek-V3's release format: each group read from its FP8 tensors, written back as FP8 beside fresh
    scales, and read back from the output for the block's outputs. The mask is the whole-block run's where
    the inputs agree (block 1); later blocks see the written FP8 weights' outputs, not the dense ones'."""
    import shutil

    from test_fp8 import fp8_weight_names, to_fp8, transformers_weights
    folder = tmp_path / "fp8"
    shutil.copytree(family("deepseek_v3"), folder)
    to_fp8(folder, block=8)
    run(folder, tmp_path / "whole", "wanda")
    run(folder, tmp_path / "groups", "wanda", expert_group_size=3)
    assert sorted(fp8_weight_names(tmp_path / "groups")) == sorted(fp8_weight_names(folder))
    whole, groups = read_all_tensors(tmp_path / "whole"), read_all_tensors(tmp_path / "groups")
    first_moe = [n for n in whole if n.startswith("model.layers.1.")]
    assert first_moe and all(torch.equal(whole[n].float(), groups[n].float()) for n in first_moe)
    reloaded = transformers_weights(tmp_path / "groups")
    expert = reloaded["model.layers.2.mlp.experts.down_proj"]
    assert (expert == 0).float().mean() == 0.5


def test_perplexity_with_experts_in_groups_equals_whole_blocks(family, tmp_path, capsys):
    """A model too large for whole blocks is evaluated with its experts read a group at a time: the same
    perplexity to the last bit (eval --expert-group-size, and --eval-ppl of a run in groups)."""
    from offload_prune.api import perplexity
    folder = family("deepseek_v3")
    text = folder / "demo.txt"
    whole = perplexity(folder, text, seqlen=SEQLEN, max_windows=4, device="cpu")
    grouped = perplexity(folder, text, seqlen=SEQLEN, max_windows=4, device="cpu", expert_group_size=3)
    assert grouped["ppl"] == whole["ppl"]
    assert main(["eval", "--model", str(folder), "--eval-data", str(text), "--seqlen", str(SEQLEN),
                 "--eval-max-windows", "4", "--expert-group-size", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == whole["ppl"]
    report = run(folder, tmp_path / "groups", "wanda", expert_group_size=3, eval_ppl=True, eval_data=str(text),
                 eval_max_windows=4)
    assert report["perplexity"]["dense"]["ppl"] == whole["ppl"]
    assert report["perplexity"]["pruned"]["ppl"] == perplexity(tmp_path / "groups", text, seqlen=SEQLEN,
                                                               max_windows=4, device="cpu")["ppl"]
