"""The Python API: the CLI's three commands as functions, taking the CLI's options by their Python names.

    import offload_prune
    report = offload_prune.prune("HuggingFaceTB/SmolLM2-135M", "out/smollm2-wanda", calib_data="text.txt",
                                 nsamples=16, seqlen=512, sparsity_ratio=0.5)
    offload_prune.plan("meta-llama/Llama-2-70b-hf", prune_method="sparsegpt", device="cuda")
    offload_prune.perplexity("out/smollm2-wanda", "wikitext2_test.txt", seqlen=512)
    offload_prune.evaluate_tasks("out/smollm2-wanda", "arc_easy,hellaswag", eval_limit=200)

Options are validated once, as the CLI validates them (`PruneConfig.validate`): a bad one raises
`OffloadPruneError` with the CLI's one-line message. Paths may be `str` or `Path`.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from .config import OffloadPruneError, PruneConfig
from .data.calibration import calibration_windows, text_size_of
from .disk.checkpoint import CheckpointReader
from .evaluation.perplexity import evaluation_windows
from .evaluation.perplexity import perplexity as streamed_perplexity
from .evaluation.tasks import evaluate_tasks as task_evaluation
from .plan.memory import (budgets, device_free_bytes, device_total_bytes, load_config_only, memory_plan, per_rank, pick_dtype,
                          resolve_activation_store)
from .plan.expert_groups import resolve_expert_groups
from .plan.micro_batch import resolve_micro_batch
from .model.loading import load_tokenizer, pick_device
from .model.skeleton import build_skeleton
from .runtime.distributed import Ranks
from .stream import pipeline
from .runtime.meter import current_host_rss_bytes


def options(model: str | Path, **chosen) -> PruneConfig:
    """The run's options from keyword arguments (the CLI's flags by their Python names), validated."""
    known = {f.name for f in fields(PruneConfig) if f.init}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise OffloadPruneError(f"unknown option {unknown[0]!r}: the options are the CLI's flags by their Python "
                                "names (sparsity_ratio, calib_data, offload_activations, ...)")
    return PruneConfig(model=str(model), **chosen).validate()


def prune(model: str | Path, save: str | Path, **chosen) -> dict:
    """Prune `model` (a local folder or a hub id) into the folder `save`; returns the report (report.json)."""
    return pipeline.prune(options(model, save=save, **chosen))


def plan(model: str | Path, ranks: int = 1, **chosen) -> dict:
    """The memory plan of a prune run with these options (one of `ranks` torchrun ranks), from config.json
    and the shard headers alone: each phase's device and host peaks and their parts. The activation store
    `auto` resolves as a run would resolve it here."""
    return planned(options(model, **chosen), ranks)[1]


def planned(config: PruneConfig, ranks: int = 1) -> tuple[PruneConfig, dict]:
    """(the options with the activation store resolved, their plan) for one of `ranks` ranks."""
    if ranks < 1:
        raise OffloadPruneError(f"--ranks must be >= 1, got {ranks}")
    # A plan for a GPU may be made where there is none: the device is named, not opened.
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device("cpu" if config.device == "cpu" else config.device)
    model_config = load_config_only(config.model)
    shard_dtypes = local_shard_dtypes(config.model)
    tokenizer = local_tokenizer(config.model)
    text_size, eval_windows = text_size_of(config.calib_data), planned_eval_windows(config, tokenizer)
    # The process term measured where the run measures it: after the calibration windows are made from a
    # local text with the model's tokenizer, as the run makes them. `plan` and the run's own plan then say
    # one number (a hub model or a named dataset is not fetched to plan: the process is measured before).
    calibration, skeleton = None, build_skeleton(model_config)  # the run holds its meta model by then too
    if tokenizer is not None and text_size:
        calibration = calibration_windows(config.calib_data, tokenizer, config.nsamples, config.seqlen, config.seed)
    process_bytes = current_host_rss_bytes()
    del calibration, skeleton
    def plan_for(chosen: PruneConfig) -> dict:
        return memory_plan(per_rank(chosen, Ranks(0, ranks)), model_config, device.type, text_size, eval_windows,
                           process_bytes=process_bytes, shard_dtypes=shard_dtypes)

    share = Ranks(0, ranks).windows(config.nsamples)
    config = resolve_expert_groups(config, plan_for, lambda plan: budgets(config, plan, device_free_bytes(device)))
    config = resolve_micro_batch(config, plan_for, share.stop - share.start, device.type, device_total_bytes(device))
    return resolve_activation_store(config, plan_for, device_free_bytes(device))


def perplexity(model: str | Path, eval_data: str | Path, seqlen: int = 2048, max_windows: int | None = None,
               device: str = "auto", dtype: str = "auto", micro_batch_size: int = 1, on_disk: bool = False,
               quiet: bool = True, expert_group_size: int | None = None) -> dict:
    """Perplexity of `model` on `eval_data` (a local text file, or wikitext2 with `datasets`), streamed
    block by block (Mixture-of-Experts blocks with their routed experts `expert_group_size` at a time, when
    given): {"model", "ppl", "windows", "seqlen", "seconds"}."""
    options(model, seqlen=seqlen, eval_max_windows=max_windows, micro_batch_size=micro_batch_size, dtype=dtype)
    reader = CheckpointReader(str(model))
    compute_on = pick_device(device)
    windows = evaluation_windows(str(eval_data), load_tokenizer(reader.folder), seqlen, max_windows)
    result = streamed_perplexity(reader, windows, compute_on, pick_dtype(dtype, compute_on, reader),
                                 micro_batch_size=micro_batch_size, on_disk=on_disk, quiet=quiet,
                                 expert_group_size=expert_group_size)
    return {"model": str(reader.folder), **result}


def evaluate_tasks(model: str | Path, eval_tasks: str = "default", **chosen) -> dict:
    """lm-evaluation-harness tasks on `model`, streamed block by block (needs the eval extra): each task's
    metrics with their stderr and document count, and each streamed pass's plan, time and peaks. `chosen`:
    eval_limit, eval_num_fewshot, eval_include_path, eval_work_dir, device, dtype, micro_batch_size,
    offload_activations (auto, ram or disk), max_host_memory, quiet."""
    config = options(model, eval_tasks=eval_tasks, **{"quiet": True, "offload_activations": "auto", **chosen})
    return task_evaluation(config.model, config)


def local_shard_dtypes(model: str) -> list[torch.dtype]:
    """The stored dtypes of a local checkpoint's tensors (its shard headers), which a run computes from;
    none for a hub id or a folder with config.json alone (the plan then goes by config.json)."""
    if not Path(model).expanduser().is_dir():
        return []
    try:
        return list(CheckpointReader(model).dtypes.values())
    except OffloadPruneError:
        return []


def local_tokenizer(model: str):
    """The tokenizer of a local model folder, loaded once for the plan; None for a hub id or a folder
    without one (config.json alone can still be planned)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    try:
        return load_tokenizer(folder)
    except OffloadPruneError:
        return None


def planned_eval_windows(config: PruneConfig, tokenizer) -> int:
    """Evaluation windows: counted with the model's tokenizer when there is one here, else
    --eval-max-windows (0 when not given: the plan then leaves the evaluation out)."""
    if not config.eval_ppl:
        return 0
    if tokenizer is not None:
        return len(evaluation_windows(config.eval_data, tokenizer, config.seqlen, config.eval_max_windows))
    return config.eval_max_windows or 0
