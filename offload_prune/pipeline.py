"""Prune a checkpoint block by block, never holding more than one decoder block of weights.

calibration windows -> layer-0 inputs (embedding only) -> for each block: load its tensors,
collect the method's statistics, prune, run the windows again through the pruned block (its
outputs feed the next block, as SparseGPT and Wanda propagate), write the block's shards,
persist the next inputs and the manifest -> copy the tensors outside the blocks, index, config
and tokenizer files -> report (and perplexity, streamed the same way).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__
from .activations import ActivationStore
from .calibration import load_text, sample_windows, tokenize
from .checkpoint import CheckpointReader, ShardLayout, copy_side_files
from .config import OffloadPruneError, PruneConfig
from .evaluate import evaluate_text
from .hostmem import keep_large_allocations_mmapped
from .methods import PruningMethod, build_method
from .masks import prune_mask
from .plan import check_budget, memory_plan
from .report import (PhaseTimer, format_summary, module_stats, peak_device_bytes,
                     peak_host_rss_bytes, totals, write_report)
from .runstate import RunState
from .selection import selected_linears
from .skeleton import StreamedModel, run_windows


def kill_point(name: str) -> None:
    """Fault injection for the resume tests: OFFLOAD_PRUNE_KILL_AT=<name> sends the process
    SIGKILL (or OFFLOAD_PRUNE_KILL_SIGNAL, e.g. INT for a Ctrl-C) at this point."""
    if os.environ.get("OFFLOAD_PRUNE_KILL_AT") == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("OFFLOAD_PRUNE_KILL_SIGNAL", "KILL")))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadPruneError(f"--device {requested}: CUDA is not available here")
    return device


def pick_dtype(requested: str, device: torch.device, reader: CheckpointReader) -> torch.dtype:
    """Compute dtype. On the CPU float32 (half-precision matmuls there are slow or missing); on a GPU
    the checkpoint's own floating dtype, in which pruned values cast back bit-exactly."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cpu":
        return torch.float32
    stored = [d for d in reader.dtypes.values() if d.is_floating_point]
    return max(set(stored), key=stored.count) if stored else torch.float32


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def load_tokenizer(folder):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise OffloadPruneError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0]})") from None


@dataclass
class Run:
    """Everything one pruning run works with, made once by `prune` and handed to each phase."""
    config: PruneConfig
    reader: CheckpointReader
    device: torch.device
    streamed: StreamedModel
    method: PruningMethod
    state: RunState
    layout: ShardLayout
    store: ActivationStore
    head: "LmHead | None"
    timer: PhaseTimer


def prune(config: PruneConfig) -> dict:
    config.validate()
    if config.save is None:
        raise OffloadPruneError("--save is required: the folder the pruned model is written to")
    keep_large_allocations_mmapped()
    timer = PhaseTimer()
    reader = CheckpointReader(config.model)  # config and shard headers only
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device, reader)
    plan = memory_plan(config, reader.config, device.type)
    check_budget(plan, config)
    streamed = StreamedModel(reader, device, dtype)
    tokenizer = load_tokenizer(reader.folder)
    with timer("calibration"):
        windows = sample_windows(tokenize(tokenizer, load_text(config.calib_data)),
                                 config.nsamples, config.seqlen, config.seed)
    fingerprint = {
        "checkpoint": reader.identity(),
        "calibration_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "options": config.result_options(),
        "device": device.type,
        "versions": {"offload_prune": __version__, "torch": torch.__version__},
    }
    state = RunState.prepare(config.save, reader.folder, fingerprint, config.overwrite, config.resume)
    resuming = state.completed_blocks > 0 or state.manifest["captured"]
    if resuming and not config.quiet:
        print(f"resuming {state.save}: {state.completed_blocks} of {streamed.num_layers} blocks already done",
              file=sys.stderr)
    head = LmHead(streamed) if config.nr_prune_lm_head else None
    store = ActivationStore(state.dir, (len(windows), config.seqlen, reader.config.hidden_size), dtype,
                            on_disk=config.offload_activations == "disk")
    run = Run(config, reader, device, streamed, build_method(config), state, _output_layout(streamed, head),
              store, head, timer)

    if not state.manifest["captured"]:
        with timer("capture"):
            _capture(run, windows)
    layer_kwargs = state.load_layer_kwargs()
    inputs = store.open(state.completed_blocks)
    with timer("prune"):
        for index in tqdm(range(state.completed_blocks, streamed.num_layers), desc="blocks", disable=config.quiet,
                          initial=state.completed_blocks, total=streamed.num_layers):
            inputs = _prune_block(run, index, layer_kwargs[index], inputs)
    with timer("write"):
        _write_outside_and_finish(run)

    report = {
        "save": str(state.save), "model": str(reader.folder), "method": config.prune_method,
        "sparsity_type": config.sparsity_type, "target_sparsity": config.effective_sparsity,
        "options": config.result_options(), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "resumed": resuming, "memory_plan": plan, "modules": state.modules, "totals": totals(state.modules),
        "nm_valid": all(m["nm_valid"] for m in state.modules.values()) if config.nm else None,
    }
    if config.eval_ppl:
        options = dict(micro_batch_size=config.micro_batch_size,
                       on_disk=config.offload_activations == "disk", quiet=config.quiet)
        report["perplexity"] = {}
        for which, folder in (("dense", reader.folder), ("pruned", state.save)):
            with timer(f"eval_{which}"):
                report["perplexity"][which] = evaluate_text(
                    CheckpointReader(str(folder)), config.eval_data, config.seqlen, config.eval_max_windows,
                    device, dtype, tokenizer, label=f"eval {which}", **options)
    report["seconds"] = timer.seconds
    report["peak_host_rss_bytes"] = peak_host_rss_bytes()
    report["peak_device_bytes"] = peak_device_bytes(device)
    write_report(state.save, report)
    if not config.quiet:
        print(format_summary(report))
    return report


def _output_layout(streamed: StreamedModel, head: "LmHead | None") -> ShardLayout:
    reader = streamed.reader
    nbytes = {n: reader.nbytes(n) for n in reader.weight_map}
    outside_names = list(streamed.outside_names)
    if head and head.name not in reader.weight_map:  # tied: the pruned head becomes a tensor of its own
        outside_names.append(head.name)
        nbytes[head.name] = reader.nbytes(head.source)
    return ShardLayout([outside_names] + [streamed.block_names(i) for i in range(streamed.num_layers)],
                       nbytes, reader.max_shard_bytes())


def _capture(run: Run, windows: torch.Tensor) -> None:
    """Layer-0 inputs of every calibration window and each layer's keyword arguments, made durable."""
    run.streamed.load_outside(with_head=False)
    layer0_inputs = run.store.create(0)
    layer_kwargs = run.streamed.capture_into(windows, layer0_inputs, run.config.quiet, "calibration: embed")
    run.streamed.unload_outside()
    run.state.save_layer_kwargs(layer_kwargs)
    run.store.commit(0)
    run.state.commit(captured=True)


def _prune_block(run: Run, index: int, layer_kwargs: dict, inputs: torch.Tensor) -> torch.Tensor:
    """Load, collect, prune, propagate, write and commit block `index`; returns the next block's inputs."""
    config, method, device = run.config, run.method, run.device
    block = run.streamed.load_block(index)
    linears = selected_linears(find_linears(block), index, run.streamed.num_layers, config)
    kill_point(f"block-start:{index}")
    method_info: dict[str, dict] = {}
    for group in (method.groups(linears) if linears else []):
        members = {n: linears[n] for n in group}
        for calibration_pass in range(method.calibration_passes if method.needs_calibration else 0):
            method.start_pass(calibration_pass)
            _collect(method, block, members, layer_kwargs, inputs, config, device)
        method_info.update(method.prune(members))
    kill_point(f"block-pruned:{index}")
    outputs = run.store.output_buffer(index + 1)
    run_windows(block, layer_kwargs, inputs, outputs, config.micro_batch_size, device)
    tensors = run.streamed.block_tensors(index)
    prefix = f"{run.streamed.layers_path}.{index}."
    modules = {prefix + name: {**module_stats(tensors[prefix + name + ".weight"], config.nm),
                               "rule": method.rule(name), **method_info.get(name, {})} for name in linears}
    run.layout.write_unit(1 + index, run.state.save, tensors, after_each_file=lambda: kill_point(f"writing:{index}"))
    run.store.commit(index + 1)
    run.state.commit(completed_blocks=index + 1, modules={**run.state.modules, **modules})
    run.streamed.unload_block(index)
    kill_point(f"block-done:{index}")
    return run.store.tensor


def _write_outside_and_finish(run: Run) -> None:
    """Tensors outside the blocks (copied, or the pruned head), index, config/tokenizer files."""
    reader, head, save = run.reader, run.head, run.state.save
    outside = reader.read(run.streamed.outside_names)
    if head:
        outside[head.name] = head.prune(reader.read([head.source])[head.source], run.config, run.device)
        run.state.modules[head.name] = {**module_stats(outside[head.name], run.config.nm), "rule": "magnitude"}
    run.layout.write_unit(0, save, outside)
    kill_point("finalize")
    run.layout.write_index(save)
    copy_side_files(reader.folder, save)
    if head and head.name != head.source:
        untie_word_embeddings(save / "config.json")
    run.state.finish()


class LmHead:
    """The output projection, pruned by magnitude at the end (--nr-prune-lm-head). A tied head has no
    tensor of its own: it is read from the embedding and written as a new tensor."""

    def __init__(self, streamed: StreamedModel):
        model = streamed.model
        paths = {module: path for path, module in model.named_modules()}
        self.name = paths[model.get_output_embeddings()] + ".weight"
        tied = self.name not in streamed.reader.weight_map
        self.source = paths[model.get_input_embeddings()] + ".weight" if tied else self.name

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, config: PruneConfig, device: torch.device) -> torch.Tensor:
        scores = weight.to(device, torch.float32).abs()
        mask = prune_mask(scores, config.sparsity_ratio, config.nm, per_row=False)
        return weight.masked_fill(mask.cpu(), 0)


def untie_word_embeddings(config_path) -> None:
    config = json.loads(config_path.read_text())
    config["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _collect(method, block: nn.Module, linears: dict[str, nn.Linear], kwargs: dict, inputs: torch.Tensor,
             config: PruneConfig, device: torch.device) -> None:
    """One pass of the calibration windows through the block with the method's statistics hooked in."""
    def hook(name):
        def observe(module, args, output) -> None:  # returning None keeps the layer's output as it is
            method.add_batch(name, args[0], output)
        return observe

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    try:
        run_windows(block, kwargs, inputs, None, config.micro_batch_size, device)
    finally:
        for handle in handles:
            handle.remove()
