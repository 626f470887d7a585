"""Prune a checkpoint block by block, never holding more than one decoder block of weights.

calibration windows -> layer-0 inputs (embedding only) -> for each block: load its tensors,
collect the method's statistics, prune, run the windows again through the pruned block (its
outputs feed the next block, as SparseGPT and Wanda propagate), write the block's shards,
persist the next inputs and the manifest -> copy the tensors outside the blocks, index, config
and tokenizer files -> report (and perplexity, streamed the same way).

Here: the run set up, and the phases of a pruning run (OWL's dense pass, the blocks pruned, the
report). What every phase shares is passes.py's (`Run`, capture, the dense pass); what is written
besides the blocks, output.py's; a run that removes blocks instead, removal_pass.py's.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Callable

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__, durable
from .activations import ActivationStore
from .block_removal import check_removal_count
from .calibration import calibration_windows
from .checkpoint import CheckpointReader
from .config import OffloadPruneError, PruneConfig
from .diskspace import check_disk_space, disk_full_message
from .distributed import Ranks
from .durable import DiskFullError
from .evaluate import evaluation_windows, perplexity
from .hostmem import collector_sees_only_new_objects, keep_large_allocations_mmapped, release_free_memory
from .layer_sparsity import OutlierCounter, owl_ratios, ratios_from_file
from .lm_head import LmHead
from .methods import PruningMethod, build_method
from .output import output_layout, write_outside
from .overlap import Behind
from .heads import heads_setting
from .neurons import width_setting
from .masks import zero_lowest
from .matrices import Matrix, find_matrices, observe, other_weights
from .passes import LAYER_KWARGS, Run, advance_inputs, capture, collect, dense_pass
from .plan import (check_budget, compute_dtype, device_free_bytes, memory_plan, per_rank,
                   resolve_activation_store, stored_dtype)
from .removal_pass import remove_blocks, removal_report
from .report import PhaseMeter, current_host_rss_bytes, format_summary, module_stats, totals
from .runstate import FollowerState, RunState
from .selection import selected_matrices
from .skeleton import StreamedModel, run_windows

REPORT_NAME = "report.json"


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadPruneError(f"--device {requested}: CUDA is not available here")
    return device


def pick_dtype(requested: str, device: torch.device, reader: CheckpointReader) -> torch.dtype:
    """The compute dtype, chosen as the memory plan chooses it (plan.compute_dtype)."""
    return compute_dtype(requested, device.type, stored_dtype(reader.config, reader.dtypes.values()))


def check_positions(streamed: StreamedModel, seqlen: int) -> None:
    limit = streamed.max_positions()
    if limit is not None and seqlen > limit:
        raise OffloadPruneError(f"--seqlen {seqlen} is more than the {limit} positions "
                                f"{type(streamed.model).__name__} has learned position embeddings for")


def load_tokenizer(folder):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise OffloadPruneError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0]})") from None


def prune(config: PruneConfig) -> dict:
    config.validate()
    if config.save is None:
        raise OffloadPruneError("--save is required: the folder the pruned model is written to")
    keep_large_allocations_mmapped()
    reader = CheckpointReader(config.model)  # config and shard headers only
    device = pick_device(config.device)
    ranks = Ranks.from_environment(device)
    try:
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
    config, plan = resolve_activation_store(config, lambda options: memory_plan(
        per_rank(options, ranks), reader.config, device.type, text_size,
        len(evaluation) if evaluation is not None else 0, process_bytes=process_bytes,
        shard_dtypes=reader.dtypes.values()),
        device_free_bytes(device))
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
    layout = output_layout(streamed, head)
    activation_shape = (len(windows), config.seqlen, reader.config.hidden_size)
    activation_bytes = math.prod(activation_shape) * dtype.itemsize
    check_disk_space(config.save, layout, activation_bytes)
    fingerprint = _fingerprint(config, reader, windows, method, device, dtype)
    if config.layer_sparsity not in ("uniform", "owl"):
        fingerprint["layer_sparsities"] = given_sparsities  # a file's ratios by content, not by its path
    if ranks.world > 1:  # each rank's activation files hold its share of the windows
        fingerprint["ranks"] = ranks.world
    state = _run_state(config, reader, fingerprint, streamed.num_layers, ranks)
    writer = Behind(config.overlap_io, "block-writer")
    try:
        if state.manifest["finished"]:
            return _already_finished(state, config)
        store = ActivationStore(state.dir, (len(windows[own_windows]), *activation_shape[1:]), dtype,
                                config.offload_activations, device, tag=ranks.tag())
        run = Run(config, reader, device, streamed, method, state, layout, store, head, meter, given_sparsities,
                  config_changes, writer, ranks)
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
        return _evaluate_and_report(run, evaluation, plan, dtype, resumed)
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
    with collector_sees_only_new_objects():  # the collection after each block then costs little
        if run.method.removes_blocks:
            remove_blocks(run, windows)
        else:
            _prune_blocks(run, windows)
    run.store.release()  # the write and evaluation phases are planned without the calibration activations
    if not state.manifest["finalized"] and run.ranks.lead:
        with meter("write"):
            write_outside(run)


def _prune_blocks(run: Run, windows: torch.Tensor) -> None:
    state, meter = run.state, run.meter
    if run.given_sparsities is None and state.manifest["layer_sparsity"] is None:
        if not state.manifest["captured"]:
            with meter("capture"):
                capture(run, windows)
        with meter("owl"):
            _measure_outliers(run)
    if not state.manifest["captured"]:
        with meter("capture"):
            capture(run, windows)
    num_layers = run.streamed.num_layers
    if state.completed_blocks < num_layers:
        layer_kwargs = torch.load(state.dir / LAYER_KWARGS, map_location="cpu", weights_only=False)
        inputs = run.store.open(state.completed_blocks)
        with meter("prune"):
            for index in tqdm(range(state.completed_blocks, num_layers), desc="blocks", disable=run.config.quiet,
                              initial=state.completed_blocks, total=num_layers):
                inputs = _prune_block(run, index, layer_kwargs[index], inputs)
            run.writer.wait()


def _already_finished(state: RunState, config: PruneConfig) -> dict:
    if not config.quiet:
        print(f"offload-prune: {state.save} already holds the finished output of this job "
              f"({state.num_layers} blocks); nothing to do", file=sys.stderr)
    return json.loads((state.save / REPORT_NAME).read_text())


def _evaluate_and_report(run: Run, evaluation: torch.Tensor | None, plan: dict, dtype: torch.dtype,
                         resumed: bool) -> dict:
    config, state, meter, device = run.config, run.state, run.meter, run.device
    report = {
        "save": str(state.save), "model": str(run.reader.folder), "method": config.prune_method,
        "sparsity_type": config.sparsity_type, "target_sparsity": config.effective_sparsity,
        "options": config.result_options(run.method.options), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "resumed": resumed, "ranks": run.ranks.world,
        "memory_plan": plan, "modules": state.modules, "unpruned": state.manifest["unpruned"],
        "totals": totals(state.modules, state.manifest["unpruned"]),
        "nm_valid": all(m["nm_valid"] for m in state.modules.values()) if config.nm else None,
        "layer_sparsity": {"rule": config.layer_sparsity if config.layer_sparsity in ("uniform", "owl") else "file",
                           "ratios": [run.block_sparsity(i) for i in range(run.streamed.num_layers)],
                           **({"outlier_ratios": [m["outlier_ratio"] for m in state.manifest["outliers"]],
                               "owl_lambda": config.owl_lambda, "owl_m": config.owl_m}
                              if config.layer_sparsity == "owl" else {})},
    }
    if run.method.removes_blocks:
        report["target_sparsity"] = None
        report["block_removal"] = removal_report(run)
        del report["layer_sparsity"]
    if config.sparsity_type == "structured":
        widths = {m["neurons"]: m["neurons_kept"] for m in state.modules.values() if "neurons" in m}
        groups = {m["key_value_groups"]: m["key_value_groups_kept"] for m in state.modules.values()
                  if "key_value_groups" in m}
        params_after, _ = run.layout.written_totals(state.save)
        report["structured"] = {"shrink": config.shrink, "neuron_refit": config.neuron_refit,
                                "widths": [[before, after] for before, after in sorted(widths.items())],
                                "key_value_groups": [[before, after] for before, after in sorted(groups.items())],
                                "params_before": sum(math.prod(shape) for shape in run.reader.shapes.values()),
                                "params_after": params_after}
    if evaluation is not None:
        options = dict(micro_batch_size=config.micro_batch_size,
                       on_disk=config.offload_activations == "disk", quiet=config.quiet)
        report["perplexity"] = {}
        for which, folder in (("dense", run.reader.folder), ("pruned", state.save)):
            with meter(f"eval_{which}"):
                report["perplexity"][which] = perplexity(CheckpointReader(str(folder)), evaluation, device, dtype,
                                                         label=f"eval {which}", **options)
    report["seconds"] = meter.seconds
    report["phase_peaks"] = meter.peaks
    report["phase_peaks_are_per_phase"] = meter.host_resets  # False: VmHWM could not be reset (not Linux)
    report["peak_host_rss_bytes"] = meter.overall("host")
    report["peak_device_bytes"] = meter.overall("device_reserved")
    record = durable.write_text(state.save / REPORT_NAME, json.dumps(report, indent=1, default=str) + "\n")
    state.commit(outputs={REPORT_NAME: record}, stage=run.streamed.num_layers + 1, finished=True)
    if not config.quiet:
        print(format_summary(report))
    return report


def _start_outliers(run: Run, index: int, block: nn.Module, layer_kwargs: dict, inputs: torch.Tensor):
    matrices = find_matrices(block)
    run.described.describe(block, matrices, lambda: run_windows(block, layer_kwargs, inputs[:1], None, 1, run.device))
    chosen = selected_matrices(matrices, index, run.streamed.num_layers, run.config)
    counter = OutlierCounter()

    def result() -> tuple[dict, dict]:
        run.ranks.sum_named(counter.sum_squares, list(chosen), lambda name: torch.zeros(
            chosen[name].in_features, dtype=torch.float64, device=chosen[name].weight.device))
        ratio, weights = counter.outlier_ratio(chosen, run.config.owl_m)
        return {"outlier_ratio": ratio, "weights": weights}, {}

    return observe(chosen, counter.add_batch, weight_by_router=True), result


def _measure_outliers(run: Run) -> None:
    """OWL's dense pass: each block's outlier ratio with its dense inputs; then the per-block
    sparsities, and the calibration capture is redone for the pruning pass (the dense activations
    are not its inputs)."""
    config, state, streamed = run.config, run.state, run.streamed
    measured = dense_pass(run, "outliers", "owl: outliers (dense)", _start_outliers)
    pruned = [i for i, m in enumerate(measured) if m["weights"]]
    ratios = owl_ratios([measured[i]["outlier_ratio"] for i in pruned], [measured[i]["weights"] for i in pruned],
                        config.sparsity_ratio, config.owl_lambda)
    sparsities = [config.sparsity_ratio] * streamed.num_layers
    for i, ratio in zip(pruned, ratios):
        sparsities[i] = ratio
    run.store.release()
    state.commit(run_files={}, layer_sparsity=sparsities, captured=False)


def _prune_block(run: Run, index: int, layer_kwargs: dict, inputs: torch.Tensor) -> torch.Tensor:
    """Load, collect, prune, propagate, write and commit block `index`; returns the next block's inputs."""
    config, device = run.config, run.device
    block = run.streamed.load_block(index)
    matrices = find_matrices(block)
    run.described.describe(block, matrices, lambda: run_windows(block, layer_kwargs, inputs[:1], None, 1, device))
    chosen = selected_matrices(matrices, index, run.streamed.num_layers, config)
    sparsity = run.block_sparsity(index)
    method_info = _prune_matrices(run, block, chosen, layer_kwargs, inputs, sparsity) if chosen else {}
    last = index + 1 == run.streamed.num_layers
    # The previous block's commit is finished before this one's outputs are made: in RAM they overwrite
    # the inputs, which it persists, and its durable steps stay in order before this block's.
    run.writer.wait()
    if not last:  # the last block's outputs feed nothing
        run_windows(block, layer_kwargs, inputs, run.store.output_buffer(index + 1), config.micro_batch_size, device,
                    run.store.written)
    next_inputs = dict if last else advance_inputs(run, index + 1)
    if run.ranks.lead:  # the other ranks write nothing and report nothing
        _commit_behind(run, index, block, matrices, chosen, method_info, next_inputs)
    run.streamed.unload_block(index)
    # A block's tensors can sit in reference cycles: freed before the next block loads, and the heap's free
    # pages handed back, so they do not add up block after block.
    release_free_memory()
    return run.store.tensor


def _commit_behind(run: Run, index: int, block: nn.Module, matrices: dict[str, Matrix], chosen: dict[str, Matrix],
                   method_info: dict[str, dict], next_inputs: Callable[[], dict[str, durable.FileRecord]]) -> None:
    """The pruned block's report entries now; its shards, the next block's inputs and the manifest on the
    writer thread, while the next block loads and collects statistics."""
    config, state = run.config, run.state
    prefix = run.streamed.block_prefix(index)
    # Counted in the dtype they are written in; every other weight matrix of the block counts in the totals too.
    stats = {name: {**module_stats(m.weight, config.nm if name in chosen else None,
                                   run.streamed.stored_dtype(prefix, m)),
                    "kind": m.kind} for name, m in matrices.items()}
    modules = {prefix + n: {**stats[n], "rule": run.method.rule(n), **method_info.get(n, {})} for n in chosen}
    unpruned = {prefix + n: stats[n] for n in matrices if n not in chosen}
    unpruned.update({prefix + n: {**module_stats(w.detach().cpu(), None), "kind": "other"}
                     for n, w in other_weights(block, matrices).items()})
    tensors = run.streamed.block_tensors(index)

    def commit_block() -> None:
        outputs = run.layout.write_unit(1 + index, state.save, tensors)
        run_files = {LAYER_KWARGS: state.run_file_record(LAYER_KWARGS), **next_inputs()}
        state.commit(outputs=outputs, stage=index, run_files=run_files, completed_blocks=index + 1,
                     modules={**state.modules, **modules}, unpruned={**state.manifest["unpruned"], **unpruned})

    run.writer.submit(commit_block)


def _prune_matrices(run: Run, block: nn.Module, chosen: dict[str, Matrix], layer_kwargs: dict,
                    inputs: torch.Tensor, sparsity: float) -> dict[str, dict]:
    """The method's groups one after another: calibration passes with its statistics hooked in, then
    its prune (or magnitude, for a matrix left without statistics). Returns what to report per matrix."""
    config, method, device = run.config, run.method, run.device
    method_info: dict[str, dict] = {}
    for group in method.groups(chosen):
        members = {n: chosen[n] for n in group}
        tokens: dict[str, int] = {}
        for calibration_pass in range(method.calibration_passes if method.needs_calibration else 0):
            method.start_pass(calibration_pass)
            collect(method, block, members, layer_kwargs, inputs, config, device,
                     tokens if calibration_pass == 0 else None)
        if run.ranks.world > 1 and method.needs_calibration:
            tokens = run.ranks.sum_counts(tokens, list(members))
            method.reduce_statistics(run.ranks, members)
        starved = _starved(members, tokens, config) if method.needs_calibration else {}
        if starved:
            method_info.update(_prune_by_magnitude(method, starved, tokens, config, sparsity))
        rest = {n: m for n, m in members.items() if n not in starved}
        if rest:
            method_info.update(_solve(run, rest, sparsity))
        for name in members:  # what each expert was pruned from
            if members[name].expert is not None and tokens:
                method_info.setdefault(name, {})["routed_tokens"] = tokens.get(name, 0)
    return method_info


def _solve(run: Run, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
    """The method's prune. Across ranks each rank solves the units dealt to it, forgetting the others'
    statistics, and every pruned matrix is then broadcast from the rank that solved it."""
    method, ranks = run.method, run.ranks
    if ranks.world == 1:
        return method.prune(linears, sparsity)
    units = method.solve_units(list(linears))
    owners = ranks.deal(units, lambda name: linears[name].weight.numel() * linears[name].in_features)
    mine = {name: linears[name] for unit, owner in zip(units, owners) if owner == ranks.rank for name in unit}
    method.discard([name for name in linears if name not in mine])
    info = method.prune(mine, sparsity) if mine else {}
    for unit, owner in zip(units, owners):
        for name in unit:
            ranks.share(linears[name].weight, owner)
            if linears[name].bias is not None:  # ria's permutation reorders biases
                ranks.share(linears[name].bias, owner)
    return {name: item for part in ranks.gather(info) for name, item in part.items()}


def _starved(members: dict[str, Matrix], tokens: dict[str, int], config: PruneConfig) -> dict[str, Matrix]:
    """Experts routed fewer than --expert-min-tokens calibration tokens, and any matrix the block's
    forward never fed (Mamba's dt_proj is read as a weight, not called)."""
    return {n: m for n, m in members.items()
            if tokens.get(n, 0) < (config.expert_min_tokens if m.expert is not None else 1)}


@torch.no_grad()
def _prune_by_magnitude(method: PruningMethod, starved: dict[str, Matrix], tokens: dict[str, int],
                        config: PruneConfig, sparsity: float) -> dict[str, dict]:
    """Matrices with (almost) no calibration statistics: pruned by magnitude instead (one threshold per
    matrix, as --prune_method magnitude)."""
    method.discard(list(starved))
    for matrix in starved.values():
        zero_lowest(matrix.weight, lambda rows, w=matrix.weight: w[rows].float().abs(), sparsity, config.nm,
                    per_row=False)
    return {n: {"rule": "magnitude", "calibration_tokens": tokens.get(n, 0),
                "fallback": "few routed tokens" if m.expert is not None else "never fed"} for n, m in starved.items()}


