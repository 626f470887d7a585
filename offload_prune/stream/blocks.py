"""The prune phase: each block loaded, its statistics collected, pruned, its outputs propagated to the
next block, and written and committed behind the next block's work.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..disk import durable
from ..model.matrices import Matrix, find_matrices, other_weights
from ..model.selection import selected_matrices
from ..model.skeleton import run_windows
from ..runtime.hostmem import release_free_memory
from .expert_blocks import GROUPS_DONE, prune_in_groups, standing_in, streaming_written
from .output import fp8_stored, fp8_written
from .owl_pass import measure_outliers
from .passes import LAYER_KWARGS, Run, advance_inputs, capture, collect
from .solving import prune_members
from .quantization import BlockQuantizer
from .reconstruction import BlockReconstruction
from .report import matrix_entries, module_stats


def prune_blocks(run: Run, windows: torch.Tensor) -> None:
    state, meter = run.state, run.meter
    if run.given_sparsities is None and state.manifest["layer_sparsity"] is None:
        if not state.manifest["captured"]:
            with meter("capture"):
                capture(run, windows)
        with meter("owl"):
            measure_outliers(run)
    if not state.manifest["captured"]:
        with meter("capture"):
            capture(run, windows)
    num_layers = run.streamed.num_layers
    if state.completed_blocks < num_layers:
        layer_kwargs = torch.load(state.dir / LAYER_KWARGS, map_location="cpu", weights_only=False)
        inputs = run.store.open(state.completed_blocks)
        reconstruction = (BlockReconstruction(run, run.store.shape, run.store.dtype)
                          if run.config.reconstruct != "off" else None)
        quantizer = BlockQuantizer(run) if run.config.quantize != "off" else None
        if quantizer is not None and run.config.quant_joint:
            run.method.round_while_pruning(quantizer.rounder_for)
        with meter("prune"):
            try:
                for index in tqdm(range(state.completed_blocks, num_layers), desc="blocks",
                                  disable=run.config.quiet, initial=state.completed_blocks, total=num_layers):
                    inputs = _prune_block(run, index, layer_kwargs[index], inputs, reconstruction, quantizer)
                run.writer.wait()
            finally:
                if reconstruction is not None:
                    run.writer.wait()  # a commit in flight may still persist the dense stream
                    reconstruction.release()


def _prune_block(run: Run, index: int, layer_kwargs: dict, inputs: torch.Tensor,
                 reconstruction: BlockReconstruction | None, quantizer: BlockQuantizer | None) -> torch.Tensor:
    """Load, collect, prune, (reconstruct, quantize,) propagate, write and commit block `index`; returns
    the next block's inputs. A block in expert groups (expert_blocks.py) commits its groups on the way."""
    config, device = run.config, run.device
    grouped = run.expert_groups.get(index)
    block = run.streamed.load_block(index)
    matrices = find_matrices(block)
    with standing_in(grouped) if grouped else contextlib.nullcontext():
        run.described.describe(block, matrices,
                               lambda: run_windows(block, layer_kwargs, inputs[:1], None, 1, device))
    chosen = selected_matrices(matrices, index, run.streamed.num_layers, config)
    sparsity = run.block_sparsity(index)
    if quantizer is not None:
        quantizer.begin(index)
    if reconstruction is not None:
        reconstruction.before_mask(index, block, layer_kwargs, inputs)
    if grouped:
        method_info = prune_in_groups(run, index, grouped, block, matrices, chosen, layer_kwargs, inputs, sparsity)
        matrices = {n: m for n, m in matrices.items() if m.expert is None}  # the groups are committed
        chosen = {n: m for n, m in chosen.items() if m.expert is None}
    else:
        method_info = _prune_matrices(run, block, chosen, layer_kwargs, inputs, sparsity) if chosen else {}
    reconstructed = (reconstruction.after_mask(index, block, matrices, layer_kwargs, inputs)
                     if reconstruction is not None and chosen else None)
    quantized = quantizer.quantize(index, block, matrices, layer_kwargs, inputs) if quantizer is not None else None
    last = index + 1 == run.streamed.num_layers
    # The previous block's commit is finished before this one's outputs are made: in RAM they overwrite
    # the inputs, which it persists, and its durable steps stay in order before this block's.
    run.writer.wait()
    if not last:  # the last block's outputs feed nothing
        with streaming_written(run, grouped) if grouped else contextlib.nullcontext():
            run_windows(block, layer_kwargs, inputs, run.store.output_buffer(index + 1), config.micro_batch_size,
                        device, run.store.written)
    pruned_inputs = dict if last else advance_inputs(run, index + 1)
    dense_inputs = reconstruction.next_inputs(index) if reconstruction is not None else dict
    if run.ranks.lead:  # the other ranks write nothing and report nothing
        _commit_behind(run, index, block, matrices, chosen, method_info, lambda: {**pruned_inputs(), **dense_inputs()},
                       reconstructed, quantized)
    run.streamed.unload_block(index)
    # A block's tensors can sit in reference cycles: freed before the next block loads, and the heap's free
    # pages handed back, so they do not add up block after block.
    release_free_memory()
    return run.store.tensor


def _commit_behind(run: Run, index: int, block: nn.Module, matrices: dict[str, Matrix], chosen: dict[str, Matrix],
                   method_info: dict[str, dict], next_inputs: Callable[[], dict[str, durable.FileRecord]],
                   reconstructed: dict | None, quantized: tuple[dict, dict] | None) -> None:
    """The pruned block's report entries now; its shards, the next block's inputs and the manifest on the
    writer thread, while the next block loads and collects statistics."""
    config, state = run.config, run.state
    prefix = run.streamed.block_prefix(index)
    # Counted in the dtype they are written in; every other weight matrix of the block counts in the totals too.
    modules, unpruned = matrix_entries(prefix, matrices, chosen, run.method.rule, method_info, config.nm,
                                       lambda m: run.streamed.stored_dtype(prefix, m))
    unpruned.update({prefix + n: {**module_stats(w.detach().cpu(), None), "kind": "other"}
                     for n, w in other_weights(block, matrices).items() if not w.is_meta})  # meta: expert groups
    tensors = fp8_stored(fp8_written(run.reader, config), run.streamed.block_tensors(index))
    if quantized is not None:  # each quantized weight stored as its packed parts
        parts, quantization = quantized
        for name, stored in parts.items():
            source = run.streamed.checkpoint_name(prefix + name + ".weight")
            del tensors[source]
            tensors.update({source[:-len("weight")] + part: tensor for part, tensor in stored.items()})
            entry = modules if prefix + name in modules else unpruned
            entry[prefix + name] = {**entry[prefix + name], "quantization": quantization[name]}
    reconstruction = ({"reconstruction": {**state.manifest.get("reconstruction", {}), str(index): reconstructed}}
                      if reconstructed is not None else {})

    def commit_block() -> None:
        outputs = run.layout.write_unit(1 + index, state.save, tensors)
        run_files = {LAYER_KWARGS: state.run_file_record(LAYER_KWARGS), **next_inputs()}
        state.commit(outputs=outputs, stage=index, run_files=run_files, completed_blocks=index + 1,
                     modules={**state.modules, **modules}, unpruned={**state.manifest["unpruned"], **unpruned},
                     **reconstruction, **{GROUPS_DONE: {}})

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
        method_info.update(prune_members(run, members, tokens, sparsity))
    return method_info
