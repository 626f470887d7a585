"""Streamed lm-eval tasks against lm-eval's own HFLM, on the same requests, each run alone in a fresh process.

    python bench/task_eval.py smollm2     # SmolLM2-135M: streamed vs HFLM with the model in RAM
    python bench/task_eval.py synthetic   # a 2 GB random Llama: streamed vs HFLM in RAM vs HFLM with accelerate's
                                        # disk offload (--offload-cap, default 512MiB of weights in RAM)
    python bench/task_eval.py synthetic --memory-cap 2GiB   # the streamed and offloaded runs in a memory cgroup

With --memory-cap, the streamed and the offloaded runs go into a cgroup-v1 memory group of that limit (page
cache included, as when a model is larger than the machine's memory), and the page cache is dropped before
each run; HFLM in RAM runs without it (it needs the whole model). Needs root and cgroup v1's memory
controller at /sys/fs/cgroup/memory.

The task is local (built here from ../shared/assets/data/wikitext2_test.txt, so nothing is downloaded):
each item is 20 words of a WikiText line; the choices are its next 5 words and 5 words of 3 other lines.
Every run prints its wall time, its peak RSS (/usr/bin/time -v), its accuracy and each request's
log-likelihood; the table gives the largest difference from HFLM in RAM. HFLM runs with lm-eval's default
batch size (1). Results: OUT/lm-eval-NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memory import machine
from peer import timed

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SMOLLM2 = Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m"))
TASK = "wiki_next_words"


def write_task(folder: Path, items: int, context_words: int) -> None:
    lines = [line.split() for line in (ASSETS / "data" / "wikitext2_test.txt").read_text().splitlines()
             if len(line.split()) > context_words + 10 and "=" not in line]
    rng = random.Random(0)
    rows = []
    for words in rng.sample(lines, items):
        start = rng.randrange(0, len(words) - context_words - 5)
        choices = [" ".join(words[start + context_words:start + context_words + 5])]
        choices += [" ".join(other[5:10]) for other in (rng.choice(lines) for _ in range(3))]
        order = rng.sample(range(4), 4)
        rows.append({"text": " ".join(words[start:start + context_words]), "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    data = folder / f"{TASK}.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{text}}\"\ndoc_to_target: label\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def run_one(system: str, model: Path, tasks: Path, work: Path, offload_cap: str) -> None:
    """In a fresh process: one system on the task; prints one JSON line."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    if system == "streamed":
        from offload_prune.evaluation.harness import StreamedLM
        lm = StreamedLM(str(model), device="cpu", dtype="float32", work_dir=work, quiet=True)
    else:
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer
        placement = ({"device_map": "auto", "max_memory": {"cpu": offload_cap}, "offload_folder": str(work / "offload")}
                     if system == "hflm-offload" else {})
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **placement).eval()
        lm = HFLM(pretrained=loaded, tokenizer=AutoTokenizer.from_pretrained(model), batch_size=1, device="cpu")
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)),
                                      log_samples=True, verbosity="ERROR")
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    print(json.dumps({"system": system, "seconds": time.perf_counter() - start,
                      "acc": results["results"][TASK]["acc,none"], "acc_norm": results["results"][TASK]["acc_norm,none"],
                      "loglikelihoods": [float(r[0][0]) for s in samples for r in s["resps"]],
                      "passes": getattr(lm, "passes", None)}, default=str))


CGROUP = Path("/sys/fs/cgroup/memory/offload-prune-bench")


def capped(command: list[str], cap: str | None) -> list[str]:
    """`command` inside the memory cgroup limited to `cap`, after dropping the page cache; as is without a cap."""
    if cap is None:
        return command
    from offload_prune.basics import parse_bytes
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(parse_bytes(cap)))
    Path("/proc/sys/vm/drop_caches").write_text("3")
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "capped", *command]


def build_synthetic(folder: Path) -> Path:
    from synthetic import build_checkpoint
    from transformers import LlamaConfig
    if not (folder / "config.json").is_file():
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
                             bos_token_id=256, eos_token_id=257, dtype="float16")
        build_checkpoint(folder, config, shard_bytes=512 << 20)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=("smollm2", "synthetic"))
    parser.add_argument("--items", type=int, default=None, help="documents (default 200 SmolLM2, 40 synthetic)")
    parser.add_argument("--offload-cap", default="512MiB", help="accelerate's max_memory for the CPU (synthetic)")
    parser.add_argument("--systems", default=None, help="comma-separated subset of hflm,streamed,hflm-offload")
    parser.add_argument("--memory-cap", default=None, help="cgroup memory limit of the streamed and offloaded runs")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "offload-prune-bench-lm-eval")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tasks = args.workdir / "tasks"
    if args.run:
        return run_one(args.run, args.model, tasks, args.workdir / args.run, args.offload_cap)
    tasks.mkdir(parents=True, exist_ok=True)
    if args.name == "smollm2":
        model, items, context, systems = SMOLLM2, args.items or 200, 20, ["hflm", "streamed"]
    else:
        model, items, context = build_synthetic(args.workdir / "synthetic-2gb"), args.items or 40, 8
        systems = ["hflm", "streamed", "hflm-offload"]
    write_task(tasks, items, context)
    systems = args.systems.split(",") if args.systems else systems
    rows = []
    for system in systems:
        shutil.rmtree(args.workdir / system, ignore_errors=True)  # a finished pass's scores would be found again
        command = [sys.executable, __file__, args.name, "--run", system, "--model", str(model), "--workdir",
                   str(args.workdir), "--offload-cap", args.offload_cap]
        wall, peak, stdout = timed(capped(command, args.memory_cap if system != "hflm" else None))
        rows.append({**json.loads(stdout.strip().splitlines()[-1]), "wall": wall, "peak_rss": peak})
    reference = next((row["loglikelihoods"] for row in rows if row["system"] == "hflm"), None)
    cap = f"; streamed and offloaded runs capped at {args.memory_cap} (cgroup, page cache dropped)" if args.memory_cap else ""
    print(f"{args.name}: {model} on {machine()}; {items} documents x 4 choices, HFLM batch size 1{cap}")
    print(f"{'system':<14} {'wall s':>8} {'peak RSS GiB':>13} {'acc':>7} {'acc_norm':>9} {'max |dLL| vs hflm':>18}")
    for row in rows:
        delta = max(abs(a - b) for a, b in zip(reference, row["loglikelihoods"])) if reference else None
        row["max_abs_difference"] = delta
        print(f"{row['system']:<14} {row['wall']:>8.1f} {row['peak_rss'] / 2**30:>13.2f} {row['acc']:>7.4f} "
              f"{row['acc_norm']:>9.4f} {'-' if delta is None else f'{delta:.2e}':>18}")
    args.out.mkdir(exist_ok=True)
    name = f"lm-eval-{args.name}" + (f"-cap{args.memory_cap}" if args.memory_cap else "") + (
        f"-{args.systems.replace(',', '-')}" if args.systems else "")
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine(), "model": str(model), "items": items,
                                                       "memory_cap": args.memory_cap, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
