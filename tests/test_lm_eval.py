"""The streamed lm-eval backend against lm-eval's own HFLM on the same model and requests: log-likelihoods
within 1e-4, identical accuracies; resuming a killed evaluation; refusals in one line; its memory plan."""
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, run_cli

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the eval extra (make setup installs it)")

from offload_prune.basics import OffloadPruneError  # noqa: E402
from offload_prune.config import PruneConfig  # noqa: E402
from offload_prune.disk.checkpoint import CheckpointReader  # noqa: E402
from offload_prune.evaluation import harness, scoring  # noqa: E402
from offload_prune.evaluation.requests import pack, padded_length  # noqa: E402
from offload_prune.evaluation.tasks import evaluate_tasks  # noqa: E402
from offload_prune.model.skeleton import StreamedModel  # noqa: E402

SMOLLM2 = Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m"))
WORDS = "the a cat dog sat ran on under mat tree house big small red blue old river stone light keeper".split()


def write_task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {folder / (name + '.jsonl')}\ntest_split: test\n{body}")


MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A multiple-choice task (one-token and longer choices, contexts over the window) and a rolling one."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    phrase = lambda low, high: " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))  # noqa: E731
    rows = [{"question": phrase(2, 14), "choices": [phrase(1, 4) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(30)]
    rows += [{"question": phrase(2, 6), "choices": list("abcd"), "label": rng.randrange(4)} for _ in range(6)]
    write_task(folder, "tiny_mc", rows, MULTIPLE_CHOICE)
    write_task(folder, "tiny_roll", [{"text": phrase(5, 200)} for _ in range(8)], ROLLING)
    write_task(folder, "tiny_gen", rows[:3], 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
               'doc_to_target: "{{choices[0]}}"\nmetric_list:\n  - metric: exact_match\n')
    return folder


def evaluate(lm, tasks: Path, names=("tiny_mc", "tiny_roll")) -> dict:
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # lm-eval's own index takes seconds
    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager,
                                   log_samples=True, verbosity="ERROR")


def scores_of(results: dict, task: str) -> list[float]:
    """Every request's log-likelihood, in document order (rolling: one per document)."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for response in sample["resps"]:
            value = response[0]
            out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def compare_with_hflm(model: Path, tasks: Path, tmp_path: Path, names, max_length: int | None) -> dict:
    from lm_eval.models.huggingface import HFLM
    reference = evaluate(HFLM(pretrained=str(model), device="cpu", batch_size=1, dtype="float32",
                              max_length=max_length), tasks, names)
    streamed = harness.StreamedLM(str(model), device="cpu", max_length=max_length, work_dir=tmp_path, quiet=True)
    ours = evaluate(streamed, tasks, names)
    for task in names:
        expected, got = scores_of(reference, task), scores_of(ours, task)
        assert len(expected) == len(got) > 0
        assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-4, task
        for metric, value in reference["results"][task].items():
            if metric.startswith("acc"):
                assert ours["results"][task][metric] == value, (task, metric)
    return {"streamed": streamed, "results": ours}


def test_loglikelihoods_equal_hflm_on_local_tasks(tiny_llama, tasks, tmp_path):
    # A 48-token window: contexts are left-truncated and long texts roll over several windows.
    compared = compare_with_hflm(tiny_llama, tasks, tmp_path, ("tiny_mc", "tiny_roll"), max_length=48)
    streamed = compared["streamed"]
    assert len(streamed.passes) == 2  # one streamed pass per request type, not per request
    # One-token choices read the same window: the pass scores more requests than it runs windows.
    assert streamed.passes[0]["windows"] < streamed.passes[0]["requests"]


def test_requests_pack_as_hflm_cuts_them():
    pairs = [([1, 2, 3], [4]), ([1, 2, 3], [5]), ([9] * 10, [7, 8]), ([1, 2], [3, 4, 5])]
    packed = pack(pairs, max_length=6, pad_id=0)
    assert packed.windows == 3  # the two one-token choices share the window [1, 2, 3]
    first, second, long, third = packed.requests
    assert (first.bucket, first.row) == (second.bucket, second.row) and first.targets == (4,)
    tokens = packed.buckets[long.bucket].tokens[long.row]
    # (context + continuation)[-(6 + 1):][:-1] = [9]*5 + [7]; the continuation scored at its last 2 positions
    assert tokens[:packed.buckets[long.bucket].lengths[long.row]].tolist() == [9] * 5 + [7]
    assert long.start == 4 and long.targets == (7, 8)
    assert third.start == 1 and packed.buckets[third.bucket].tokens[third.row][:4].tolist() == [1, 2, 3, 4]
    assert [padded_length(n) for n in (1, 9, 33, 100, 1000)] == [8, 16, 40, 104, 1024]
    with pytest.raises(OffloadPruneError, match="cannot be scored"):
        pack([([1], [2] * 7)], max_length=6, pad_id=0)


class Killed(Exception):
    pass


@pytest.mark.parametrize("where,kill_at", [("ram", "block 1"), ("disk", "block 2"), ("ram", "head")])
def test_a_killed_evaluation_resumes_to_the_same_scores(tiny_llama, tmp_path, monkeypatch, where, kill_at):
    rng = random.Random(1)
    pairs = [([rng.randrange(256) for _ in range(rng.randint(1, 40))], [rng.randrange(256) for _ in range(rng.randint(1, 5))])
             for _ in range(25)]
    packed = pack(pairs, max_length=64, pad_id=0)
    reader = CheckpointReader(str(tiny_llama))
    run = dict(device=torch.device("cpu"), dtype=torch.float32, where=where, micro_batch_size=2, quiet=True)
    expected, _ = scoring.score(reader, packed, work=tmp_path / "uninterrupted", **run)

    if kill_at == "head":
        def killed(*args, **kwargs):
            raise Killed
        monkeypatch.setattr(StreamedModel, "head_logits", killed)
    else:
        original, unloaded = StreamedModel.unload_block, []

        def killed(self, index):
            original(self, index)
            unloaded.append(index)
            if len(unloaded) == int(kill_at.split()[1]):
                raise Killed  # after the block ran, before its outputs were committed
        monkeypatch.setattr(StreamedModel, "unload_block", killed)
    with pytest.raises(Killed):
        scoring.score(reader, packed, work=tmp_path / "killed", **run)
    monkeypatch.undo()
    (folder,) = (tmp_path / "killed").iterdir()
    manifest = json.loads((folder / ".offload-prune-run" / "manifest.json").read_text())
    assert manifest["completed_blocks"] == {"block 1": 0, "block 2": 1, "head": 3}[kill_at]
    calls = []
    original_load = StreamedModel.load_block
    monkeypatch.setattr(StreamedModel, "load_block", lambda self, i: calls.append(i) or original_load(self, i))
    resumed, _ = scoring.score(reader, packed, work=tmp_path / "killed", **run)
    assert calls == list(range(manifest["completed_blocks"], 3))  # committed blocks are not run again
    assert resumed == expected  # bit for bit
    assert sorted(p.name for p in folder.iterdir()) == [".offload-prune-run", scoring.SCORES_NAME]
    assert json.loads((folder / ".offload-prune-run" / "manifest.json").read_text())["run_files"] == {}


def test_task_evaluation_within_its_plan_and_cleaned_up(tiny_llama, tasks, tmp_path):
    config = PruneConfig(model=str(tiny_llama), eval_tasks="tiny_mc,tiny_roll", eval_include_path=str(tasks),
                         eval_work_dir=str(tmp_path / "work"), quiet=True, offload_activations="auto").validate()
    result = evaluate_tasks(tiny_llama, config)
    assert set(result["tasks"]) == {"tiny_mc", "tiny_roll"}
    mc = result["tasks"]["tiny_mc"]
    assert mc["n"] == 36 and 0 <= mc["metrics"]["acc"]["value"] <= 1 and mc["metrics"]["acc"]["stderr"] > 0
    for done in result["passes"]:
        assert done["plan"]["activation_store"] == "ram"
        assert done["peaks"]["host"] <= 1.10 * done["plan"]["host"]["peak"], done
    assert list((tmp_path / "work").iterdir()) == []  # nothing left to resume once the results are out


def test_cli_eval_json_and_refusals(tiny_llama, tasks, tmp_path, capsys):
    base = ["eval", "--model", tiny_llama, "--include-path", tasks, "--eval-work-dir", tmp_path, "--quiet"]
    done = run_cli(*base, "--tasks", "tiny_mc", "--limit", "5", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tasks"]["tiny_mc"]["n"] == 5 and "acc_norm" in result["tasks"]["tiny_mc"]["metrics"]
    from offload_prune import cli
    refusals = {("--tasks", "tiny_mcq"): "unknown task 'tiny_mcq' (did you mean tiny_mc",
                ("--tasks", "tiny_gen"): "task tiny_gen generates text",
                ("--tasks", "tiny_mc", "--limit", "0"): "--limit must be > 0",
                ("--tasks", "tiny_mc", "--num-fewshot", "-1"): "--num-fewshot must be >= 0",
                ("--tasks", "tiny_mc", "--max-host-memory", "1MiB"): "over --max-host-memory 1.00 MiB",
                ("--tasks", ","): "--eval-tasks needs task names"}
    for extra, message in refusals.items():  # in this process: the CLI's main, as the console script calls it
        capsys.readouterr()
        assert cli.main([str(a) for a in (*base, *extra)]) == 2, extra
        stderr = capsys.readouterr().err
        # One line, the last (lm-eval's own progress bars, which --quiet does not reach, may come before it).
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("offload-prune: error: ") and message in last and "Traceback" not in stderr, stderr


def test_refusals_before_any_weight_is_read(tiny_llama, tasks, tmp_path, monkeypatch):
    write_task(tasks, "hub_only", [{}], "dataset_path: offload-prune-test/does-not-exist\n" + MULTIPLE_CHOICE)
    (tasks / "hub_only.yaml").write_text((tasks / "hub_only.yaml").read_text().replace(
        "dataset_kwargs:\n  data_files:\n    test: " + str(tasks / "hub_only.jsonl") + "\n", ""))
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = run_cli("eval", "--model", tiny_llama, "--include-path", tasks, "--tasks", "hub_only", env_extra=offline)
    assert done.returncode == 2 and "task hub_only: its dataset could not be loaded" in done.stderr, done.stderr
    # A prune run refuses before it prunes: nothing is written.
    save = tmp_path / "pruned"
    done = run_cli("--model", tiny_llama, "--save", save, "--calib-data", tiny_llama / "demo.txt", "--nsamples", 2,
                   "--seqlen", 16, "--eval-tasks", "tiny_nope", "--include-path", tasks)
    assert done.returncode == 2 and "unknown task 'tiny_nope'" in done.stderr and not save.exists()
    # Without lm-eval the error says how to install it.
    from offload_prune import cli
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert cli.main(["eval", "--model", str(tiny_llama), "--tasks", "arc_easy"]) == 2


def test_prune_with_eval_tasks_reports_dense_and_pruned(tiny_llama, tasks, tmp_path):
    save = tmp_path / "pruned"
    done = run_cli("--model", tiny_llama, "--save", save, "--calib-data", tiny_llama / "demo.txt", "--nsamples", 2,
                   "--seqlen", 16, "--eval-tasks", "tiny_mc", "--include-path", tasks, "--eval-work-dir",
                   tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert "lm-eval tasks (streamed)" in done.stdout and "tiny_mc" in done.stdout
    report = json.loads((save / "report.json").read_text())
    dense, pruned = (report["task_evaluation"][w]["tasks"]["tiny_mc"] for w in ("dense", "pruned"))
    assert dense["n"] == pruned["n"] == 36
    assert set(dense["metrics"]) == {"acc", "acc_norm"}
    # The dense column is the input model's own accuracy, as lm-eval's HFLM measures it.
    from lm_eval.models.huggingface import HFLM
    reference = evaluate(HFLM(pretrained=str(tiny_llama), device="cpu", batch_size=1, dtype="float32"), tasks,
                         ("tiny_mc",))
    assert dense["metrics"]["acc"]["value"] == reference["results"]["tiny_mc"]["acc,none"]


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file() or not (ASSETS / "data" / "wikitext2_test.txt").is_file(),
                    reason="SmolLM2-135M (bench/README) or ../shared/assets/data is not on this machine")
def test_smollm2_matches_hflm_on_a_task_built_from_wikitext(tmp_path):
    """200 items: the next five words of a WikiText line against five words from other lines."""
    lines = [line.split() for line in (ASSETS / "data" / "wikitext2_test.txt").read_text().splitlines()
             if len(line.split()) > 30 and "=" not in line]
    rng = random.Random(0)
    rows = []
    for words in rng.sample(lines, 200):
        start = rng.randrange(0, len(words) - 25)
        others = [rng.choice(lines) for _ in range(3)]
        choices = [" ".join(words[start + 20:start + 25])] + [" ".join(o[5:10]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"question": " ".join(words[start:start + 20]), "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    write_task(tmp_path, "wiki_mc", rows, MULTIPLE_CHOICE.replace("Question: {{question}}\\nAnswer:", "{{question}}"))
    compared = compare_with_hflm(SMOLLM2, tmp_path, tmp_path / "work", ("wiki_mc",), max_length=None)
    assert compared["results"]["results"]["wiki_mc"]["acc,none"] > 0.5  # a real model beats chance (0.25)


def test_lm_eval_command_line_runs_the_streamed_backend(tiny_llama, tasks, tmp_path):
    import subprocess
    argv = ["offload-prune-lm-eval", "--model", "offload_prune", "--model_args",
            f"pretrained={tiny_llama},quiet=True,work_dir={tmp_path}", "--device", "cpu", "--tasks", "tiny_mc",
            "--include_path", str(tasks), "--limit", "5"]
    done = subprocess.run([sys.executable, "-c", "import sys; from offload_prune.evaluation.harness import "
                           f"lm_eval_main; sys.argv = {argv!r}; lm_eval_main()"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "offload_prune (" in done.stdout and "|tiny_mc|" in done.stdout.replace(" ", "")


def test_peak_memory_is_one_block_and_the_cache_not_the_model(checkpoint_factory, tasks, tmp_path):
    """Four times the blocks, about the same peak: the model is never held whole."""
    peaks, block_bytes = {}, (4 * 512 * 512 + 3 * 512 * 1536) * 4
    for layers in (2, 8):
        model = checkpoint_factory(num_layers=layers, hidden=512, intermediate=1536, heads=8, kv_heads=8,
                                   max_shard_size="8MB")
        config = PruneConfig(model=str(model), eval_tasks="tiny_mc", eval_include_path=str(tasks), eval_limit=10,
                             eval_work_dir=str(tmp_path / str(layers)), quiet=True).validate()
        (done,) = evaluate_tasks(model, config)["passes"]
        peaks[layers] = done["peaks"]["host"]
    # 6 more blocks would add 6 x 13.6 MB if the model were held; one block's worth of noise is allowed.
    assert peaks[8] - peaks[2] < block_bytes, (peaks, block_bytes)


def test_one_process_per_evaluation_folder(tiny_llama, tmp_path):
    """The same evaluation started twice: the second is refused in one line while the first holds the lock."""
    import fcntl
    packed = pack([([1, 2, 3], [4])], max_length=16, pad_id=0)
    reader = CheckpointReader(str(tiny_llama))
    device, dtype = torch.device("cpu"), torch.float32
    folder = scoring.state_folder(tmp_path, scoring.fingerprint(reader, packed, device, dtype, 1))
    folder.mkdir(parents=True)
    holder = os.open(folder, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(OffloadPruneError, match="the evaluation folder .* is in use by another offload-prune"):
            scoring.score(reader, packed, device, dtype, "ram", 1, tmp_path, quiet=True)
    finally:
        os.close(holder)
    scores, _ = scoring.score(reader, packed, device, dtype, "ram", 1, tmp_path, quiet=True)
    assert len(scores) == 1 and scores[0][0] < 0


def test_experts_in_groups_score_as_whole_blocks(tasks, tmp_path):
    """A Mixture-of-Experts model scored with its routed experts read three at a time: the same log-likelihoods
    to the bit as with whole blocks (DeepSeek-V3's shape: a dense block, then blocks of 8 experts)."""
    from families import build_family
    model = build_family(tmp_path / "deepseek_v3", "deepseek_v3")
    whole = evaluate(harness.StreamedLM(str(model), device="cpu", work_dir=tmp_path / "whole", quiet=True), tasks,
                     ("tiny_mc",))
    grouped = evaluate(harness.StreamedLM(str(model), device="cpu", work_dir=tmp_path / "grouped", quiet=True,
                                          expert_group_size=3), tasks, ("tiny_mc",))
    assert scores_of(grouped, "tiny_mc") == scores_of(whole, "tiny_mc")
