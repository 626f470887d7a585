"""Prune a checkpoint block by block, never holding more than one decoder block of weights.

calibration windows -> layer-0 inputs (embedding only) -> for each block: load its tensors,
collect the method's statistics, prune, run the windows again through the pruned block (its
outputs feed the next block, as SparseGPT and Wanda propagate), write the block's shards,
persist the next inputs and the manifest -> copy the tensors outside the blocks, index, config
and tokenizer files -> report (and perplexity, streamed the same way).

Here: the run set up and its phases called in order. The blocks pruned are blocks.py's, OWL's dense
pass owl_pass.py's, the evaluations and report finish.py's. What every phase shares is passes.py's
(`Run`, capture, the dense pass); what is written besides the blocks, output.py's; a run that
removes blocks instead, removal_pass.py's.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys

import torch
import transformers

from .. import __version__
from ..config import OffloadPruneError, PruneConfig
from ..data.calibration import calibration_windows
from ..disk.checkpoint import CheckpointReader
from ..disk.diskspace import check_disk_space, disk_full_message
from ..disk.durable import DiskFullError
from ..disk.runstate import FollowerState, RunState, check_output_folder, recorded_fingerprint
from ..evaluation.perplexity import evaluation_windows
from ..evaluation.tasks import check_tasks
from ..methods import PruningMethod, build_method
from ..model.lm_head import LmHead
from ..model.expert_groups import GroupedBlock, grouped_blocks
from ..model.loading import load_tokenizer, pick_device
from ..model.skeleton import StreamedModel
from ..plan.expert_groups import resolve_expert_groups
from ..plan.memory import (budgets, check_budget, device_free_bytes, device_total_bytes, memory_plan, pick_dtype,
                           per_rank, resolve_activation_store)
from ..plan.micro_batch import resolve_micro_batch
from ..quantize.grid import Grid
from ..reconstruct import training_dtype
from ..runtime.activations import ActivationStore
from ..runtime.distributed import Ranks
from ..runtime.hostmem import collector_sees_only_new_objects, keep_large_allocations_mmapped
from ..runtime.meter import PhaseMeter, current_host_rss_bytes
from ..runtime.overlap import Behind
from ..surgery.block_removal import check_removal_count
from ..surgery.heads import heads_setting
from ..surgery.layer_sparsity import ratios_from_file
from ..surgery.neurons import width_setting
from .blocks import prune_blocks
from .finish import REPORT_NAME, evaluate_and_report
from .output import fp8_written, output_layout, write_outside
from .passes import Run
from .removal_pass import remove_blocks


def check_positions(streamed: StreamedModel, seqlen: int) -> None:
    limit = streamed.max_positions()
    if limit is not None and seqlen > limit:
        raise OffloadPruneError(f"--seqlen {seqlen} is more than the {limit} positions "
                                f"{type(streamed.model).__name__} has learned position embeddings for")


def prune(config: PruneConfig) -> dict:
    config.validate()
    if config.save is None:
        raise OffloadPruneError("--save is required: the folder the pruned model is written to")
    keep_large_allocations_mmapped()
    reader = CheckpointReader(config.model)  # config and shard headers only
    check_output_folder(config.save, reader.folder)
    if config.output_dtype != "auto" and reader.fp8 is None:
        raise OffloadPruneError(f"--output-dtype {config.output_dtype} converts an FP8 checkpoint's weights; "
                                f"{reader.folder} stores none")
    if config.eval_tasks:  # refused now, not after the pruning: lm-eval missing, a task unknown or out of reach
        check_tasks(config)
    device = pick_device(config.device)
    ranks = Ranks.from_environment(device)
    try:
        # Everything alive now (torch, transformers, the tokenizer's modules) is out of the collector's
        # sight for the run: each phase's and each block's full collection then scans only what the run made.
        with collector_sees_only_new_objects():
            return _prune_on_ranks(config, reader, ranks.device(device), ranks)
    finally:
        ranks.close()


def _prune_on_ranks(config: PruneConfig, reader: CheckpointReader, device: torch.device, ranks: Ranks) -> dict:
    if ranks.world > config.nsamples:
        raise OffloadPruneError(f"--nsamples {config.nsamples} leaves some of the {ranks.world} ranks without a "
                                "calibration window")
    if not ranks.lead:  # one summary and one set of progress bars, rank 0's
        config = config.replaced(quiet=True)
    dtype = pick_dtype(config.dtype, device, reader)
    meter = PhaseMeter(device)
    streamed = StreamedModel(reader, device, dtype, read_ahead=config.overlap_io)
    check_positions(streamed, config.seqlen)
    if config.blocks_to_remove is not None:
        check_removal_count(config.blocks_to_remove, streamed.num_layers)
    # Refuses now, before any weight is read, if config.json cannot hold the new MLP width.
    config_changes = width_setting(reader.config, config.sparsity_ratio) if config.shrink else {}
    if config.prune_heads:  # checked even when the groups are only zeroed
        heads_change, _ = heads_setting(reader.config, config.prune_heads)
        config_changes.update(heads_change if config.shrink else {})
    tokenizer = load_tokenizer(reader.folder)
    with meter("calibration"):
        windows, text_size = calibration_windows(config.calib_data, tokenizer, config.nsamples, config.seqlen,
                                                 config.seed)
        evaluation = (evaluation_windows(config.eval_data, tokenizer, config.seqlen, config.eval_max_windows)
                      if config.eval_ppl and ranks.lead else None)  # rank 0 evaluates
    process_bytes = current_host_rss_bytes()
    asked = config.offload_activations
    own_windows = ranks.windows(len(windows))
    def plan_for(options: PruneConfig) -> dict:
        return memory_plan(per_rank(options, ranks), reader.config, device.type, text_size,
                           len(evaluation) if evaluation is not None else 0, process_bytes=process_bytes,
                           shard_dtypes=reader.dtypes.values())

    asked_micro_batch = config.micro_batch_size
    asked_groups = config.expert_group_size
    recorded = recorded_fingerprint(config.save) or {}
    if asked_groups == "auto" and "expert_group_size" in recorded:  # a resumed run keeps its groups, or none
        config = config.replaced(expert_group_size=recorded["expert_group_size"] or "auto")
    else:
        config = resolve_expert_groups(config, plan_for, lambda plan: budgets(config, plan, device_free_bytes(device)))
    config = resolve_micro_batch(config, plan_for, len(windows[own_windows]), device.type, device_total_bytes(device))
    config, plan = resolve_activation_store(config, plan_for, device_free_bytes(device))
    if config.reconstruct != "off":  # the fingerprint records what computed, not "auto"
        config = config.replaced(recon_dtype=training_dtype(config.recon_dtype, device))
    if asked_micro_batch == "auto" and device.type != "cpu" and not config.quiet:
        print(f"--micro-batch-size auto: {config.micro_batch_size}", file=sys.stderr)
    if asked_groups == "auto" and config.expert_group_size != "auto" and not config.quiet:
        print(f"--expert-group-size auto: {config.expert_group_size} (a whole expert block does not fit)",
              file=sys.stderr)
    if asked == "auto" and not config.quiet:
        print(f"--offload-activations auto: {config.offload_activations} (device plan "
              f"{plan['device']['peak'] / 2**30:.2f} GiB, host plan {plan['host']['peak'] / 2**30:.2f} GiB)",
              file=sys.stderr)
    check_budget(plan, config)  # still before any weight is read
    method = build_method(config, reader.config)
    _check_ranks(ranks, method, config)
    if config.layer_sparsity in ("uniform", "owl"):
        given_sparsities = [config.sparsity_ratio] * streamed.num_layers if config.layer_sparsity == "uniform" else None
    else:
        given_sparsities = ratios_from_file(config.layer_sparsity, streamed.num_layers)
    head = LmHead(streamed) if config.nr_prune_lm_head else None
    expert_groups = _expert_groups(config, streamed, ranks, method)
    layout = output_layout(streamed, head, grid=Grid.of(config) if config.quantize != "off" else None,
                           fp8=fp8_written(reader, config),
                           expert_groups={index: grouped.names() for index, grouped in expert_groups.items()})
    activation_shape = (len(windows), config.seqlen, reader.config.hidden_size)
    activation_bytes = math.prod(activation_shape) * dtype.itemsize
    check_disk_space(config.save, layout, activation_bytes)
    fingerprint = _fingerprint(config, reader, windows, method, device, dtype)
    if config.layer_sparsity not in ("uniform", "owl"):
        fingerprint["layer_sparsities"] = given_sparsities  # a file's ratios by content, not by its path
    if ranks.world > 1:  # each rank's activation files hold its share of the windows
        fingerprint["ranks"] = ranks.world
    # The same weights in other shards: a resumed run with --expert-group-size auto takes the recorded size.
    fingerprint["expert_group_size"] = config.expert_group_size if expert_groups else None
    state = _run_state(config, reader, fingerprint, streamed.num_layers, ranks)
    writer = Behind(config.overlap_io, "block-writer")
    try:
        if state.manifest["finished"]:
            return _already_finished(state, config)
        store = ActivationStore(state.dir, (len(windows[own_windows]), *activation_shape[1:]), dtype,
                                config.offload_activations, device, tag=ranks.tag())
        run = Run(config, reader, device, streamed, method, state, layout, store, head, meter, given_sparsities,
                  config_changes, writer, ranks, expert_groups=expert_groups)
        resumed = state.started
        try:
            try:
                _prune_and_write(run, windows[own_windows])
            finally:  # a block being committed is finished before the run stops, on an error too
                writer.close()
                streamed.close()
        except DiskFullError as exc:
            raise OffloadPruneError(disk_full_message(exc, state.save, layout, activation_bytes)) from None
        if not ranks.lead:
            return {"rank": ranks.rank, "ranks": ranks.world, "save": str(state.save)}
        return evaluate_and_report(run, evaluation, plan, dtype, resumed)
    finally:
        state.release()


def _check_ranks(ranks: Ranks, method: PruningMethod, config: PruneConfig) -> None:
    """Refuses, before any weight is read, what does not run across torchrun ranks."""
    if ranks.world > 1 and not method.runs_on_ranks:
        what = f"--prune_method {config.prune_method}"
        if config.sparsity_type == "structured":
            what = "--sparsity_type structured"
        raise OffloadPruneError(f"{what} does not run across torchrun ranks yet (magnitude, wanda, sparsegpt, "
                                "admm and ria do, unstructured and N:M); run it in one process")
    if ranks.world > 1 and config.quant_joint:
        raise OffloadPruneError("--quant-joint does not run across torchrun ranks yet (GPTQ after the mask does); "
                                "run it in one process")


def _expert_groups(config: PruneConfig, streamed: StreamedModel, ranks: Ranks,
                   method: PruningMethod) -> dict[int, GroupedBlock]:
    """The blocks streamed in expert groups (--expert-group-size), refused where that does not run yet."""
    if config.expert_group_size == "auto" or method.removes_blocks:
        return {}
    for what, used in (("torchrun ranks", ranks.world > 1), ("--reconstruct", config.reconstruct != "off"),
                       ("--quantize", config.quantize != "off"), ("--layer-sparsity owl", config.layer_sparsity == "owl")):
        if used:
            raise OffloadPruneError(f"--expert-group-size does not run with {what} yet")
    return grouped_blocks(streamed, config.expert_group_size)


def _run_state(config: PruneConfig, reader: CheckpointReader, fingerprint: dict, num_layers: int,
               ranks: Ranks) -> RunState:
    """Rank 0 locks the output folder and starts or picks up the run; the other ranks follow its manifest."""
    state = None
    try:
        if ranks.lead:
            state = RunState.prepare(config.save, reader.folder, fingerprint, num_layers, config.overwrite,
                                     config.resume)
    finally:  # the others learn of a refusal too, rather than waiting for a manifest
        manifest = ranks.from_lead(state.manifest if state else None)
    if state is not None:
        return state
    if manifest is None:
        raise OffloadPruneError("rank 0 stopped before the run started (its message says why)")
    return FollowerState(config.save, manifest, num_layers)


def _fingerprint(config: PruneConfig, reader: CheckpointReader, windows: torch.Tensor, method: PruningMethod,
                 device: torch.device, dtype: torch.dtype) -> dict:
    """What identifies the job for resuming: what changes the result, by content, not by spelling."""
    return {
        "checkpoint": reader.identity(),
        "calibration_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "options": config.result_options(method.options),
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"offload_prune": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def _prune_and_write(run: Run, windows: torch.Tensor) -> None:
    state, meter, quiet = run.state, run.meter, run.config.quiet
    if state.started and not quiet:
        owl = (f" (owl's dense pass: {len(state.manifest['outliers'])} measured)"
               if run.given_sparsities is None and state.manifest["layer_sparsity"] is None else "")
        print(f"resuming {state.save}: {state.completed_blocks} of {run.streamed.num_layers} blocks already done{owl}",
              file=sys.stderr)
    if run.method.removes_blocks:
        remove_blocks(run, windows)
    else:
        prune_blocks(run, windows)
    run.store.release()  # the write and evaluation phases are planned without the calibration activations
    if not state.manifest["finalized"] and run.ranks.lead:
        with meter("write"):
            write_outside(run)


def _already_finished(state: RunState, config: PruneConfig) -> dict:
    if not config.quiet:
        print(f"offload-prune: {state.save} already holds the finished output of this job "
              f"({state.num_layers} blocks); nothing to do", file=sys.stderr)
    return json.loads((state.save / REPORT_NAME).read_text())
