"""lm-evaluation-harness tasks on a model streamed block by block: accuracy as the pruning papers report it.

lm-eval builds each task's requests from its dataset; the streamed backend (harness.py) scores them,
one pass over the checkpoint per request type. Every refusal happens before a weight is read: lm-eval
missing, an unknown task, a task whose dataset cannot be had (offline), a generation task.
"""
from __future__ import annotations

import difflib
import logging
import time
from pathlib import Path

from ..basics import OffloadPruneError
from ..config import PruneConfig
from ..disk import durable
from ..model.loading import pick_device

INSTALL_HINT = "pip install 'offload-prune[eval]'"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise OffloadPruneError(f"task evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def evaluate_tasks(model: str | Path, config: PruneConfig, label: str = "eval") -> dict:
    """Each task's metrics on `model` (a local folder): {"model", "tasks": {name: {"metrics": {metric:
    {"value", "stderr"}}, "n"}}, "passes": [...], "seconds"}. Options are the run's (--eval-tasks, --limit,
    --num-fewshot, --include-path, device, dtype, micro-batch, request cache store, --eval-work-dir)."""
    lm_eval = require_lm_eval()
    from .harness import DEFAULT_WORK, StreamedLM

    start = time.perf_counter()
    names, manager = config.task_names, check_tasks(config)
    work = Path(config.eval_work_dir).expanduser() if config.eval_work_dir else DEFAULT_WORK
    micro_batch = 1 if config.micro_batch_size == "auto" else config.micro_batch_size
    lm = StreamedLM(str(model), device=str(pick_device(config.device)), dtype=config.dtype, micro_batch_size=micro_batch,
                    offload_activations="auto" if config.offload_activations in ("auto", "device")
                    else config.offload_activations, max_host_memory=config.max_host_memory, work_dir=work,
                    quiet=config.quiet, label=label,
                    expert_group_size=config.expert_group_size if config.expert_group_size != "auto" else None)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=config.eval_num_fewshot,
                                      limit=config.eval_limit, task_manager=manager, log_samples=False,
                                      verbosity="ERROR" if config.quiet else "WARNING")
    for folder in lm.state_folders:  # the scores are in `results` now: nothing left to resume
        durable.remove(folder)
    return {"model": str(lm.reader.folder), "tasks": task_metrics(results), "passes": lm.passes,
            "num_fewshot": config.eval_num_fewshot, "limit": config.eval_limit,
            "seconds": time.perf_counter() - start}


def check_tasks(config: PruneConfig):
    """lm-eval's task manager, once every task of --eval-tasks is known, loadable (its dataset at hand) and
    scored by log-likelihood; one line otherwise. A prune run checks before it starts."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if config.quiet:
        import datasets

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    names = config.task_names
    local = str(Path(config.eval_include_path).expanduser()) if config.eval_include_path else None
    # lm-eval's own task index takes seconds to build: not when --include-path holds every task asked for.
    manager = TaskManager(include_path=local, include_defaults=False) if local else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=local)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise OffloadPruneError(f"unknown task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                    "; local task YAMLs are found with --include-path"))
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets' own errors: offline, missing, gated
            raise OffloadPruneError(
                f"task {name}: its dataset could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "offline, load it once where the hub can be reached (it stays in the datasets cache, then set "
                "HF_DATASETS_OFFLINE=1), or describe it in a local task YAML with --include-path") from None
        generating = sorted(task for task, obj in loaded["tasks"].items()
                            if obj.get_config("output_type") == "generate_until")
        if generating:
            raise OffloadPruneError(f"task {generating[0]} generates text, which the streamed backend does not do "
                                    "(each new token would read every block again); it scores multiple choice "
                                    "and perplexity tasks")
    return manager


def task_metrics(results: dict) -> dict:
    """lm-eval's results as {task: {"metrics": {name: {"value", "stderr"}}, "n": documents}}."""
    out = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr"):
                continue
            stderr = values.get(f"{name}_stderr,{filter_name}")
            metrics[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        samples = results.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": metrics, "n": samples.get("effective")}
    return out


def format_task_table(columns: dict[str, dict]) -> list[str]:
    """Lines of a table: one row per task and metric, one column per evaluated model (dense, pruned)."""
    rows = []
    names = list(columns)
    tasks = sorted({task for result in columns.values() for task in result["tasks"]})
    for task in tasks:
        first = next(result["tasks"][task] for result in columns.values() if task in result["tasks"])
        for metric in first["metrics"]:
            cells = []
            for name in names:
                entry = columns[name]["tasks"].get(task, {}).get("metrics", {}).get(metric)
                cells.append("-" if entry is None else f"{entry['value']:.4f}" + (
                    f" ± {entry['stderr']:.4f}" if entry["stderr"] is not None else ""))
            rows.append(f"  {task:<16} {metric:<16} " + "  ".join(f"{cell:<18}" for cell in cells)
                        + f"  (n={first['n']})")
    return [f"  {'task':<16} {'metric':<16} " + "  ".join(f"{name:<18}" for name in names), *rows]
