"""Reconstruction in the prune phase (--reconstruct): the target made before a block's mask, the pruned
block trained after it (reconstruct/).

With the `dense-stream` target the dense model's own hidden states are carried block to block in a second
activation cache (files acts_NNNNN.dense.bin), persisted and committed with the first, so that a crash
resumes at the next block with both streams. In RAM its outputs overwrite its inputs, as the first cache's
do: the previous block's commit, which persists them, is waited for first.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..disk import durable
from ..model.matrices import Matrix
from ..model.skeleton import run_windows
from ..reconstruct import TargetBuffer, reconstruct_block, trained_parameters, training_units
from ..reconstruct.units import modules_in_call_order
from ..runtime.activations import ActivationStore
from .passes import Run, advance_inputs

#: What tells the dense stream's activation files from the pruned stream's.
DENSE_STREAM_TAG = ".dense"


class BlockReconstruction:
    """One run's reconstruction: where the targets are, and the hooks around each block's mask."""

    def __init__(self, run: Run, shape: tuple[int, ...], dtype: torch.dtype, stages: int | None = None):
        self.run = run
        self.stages = stages if stages is not None else run.streamed.num_layers  # blocks the output keeps
        config, state, device = run.config, run.state, run.device
        where = config.offload_activations
        self.dense_stream = (ActivationStore(state.dir, shape, dtype, where, device,
                                             tag=DENSE_STREAM_TAG + run.ranks.tag())
                             if config.recon_target == "dense-stream" else None)
        self.buffer = (TargetBuffer(shape, dtype, where, device, state.save, run.ranks.tag())
                       if self.dense_stream is None else None)
        self._target: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._dense: dict[str, torch.Tensor] | None = None

    def before_mask(self, index: int, block: nn.Module, layer_kwargs: dict, inputs: torch.Tensor) -> None:
        """The block's target outputs, while it is still dense; for sub-layers' own targets, its weights too."""
        self.start_target(index, inputs)
        self.target_through(block, layer_kwargs, last=True)
        if self.dense_stream is None and self.run.config.reconstruct == "sublayer":
            self._dense = {n: p.detach().clone() for n, p in block.named_parameters()}

    def start_target(self, index: int, inputs: torch.Tensor, streams_equal: bool = False) -> None:
        """Begin the target of the block at `index` (of the output) whose pruned-stream inputs are `inputs`:
        the dense blocks that target_through runs next start from those inputs (`dense-block`) or from the
        dense stream's hidden states at the same place (`dense-stream`); those are `inputs` too at the first
        block, or where the caller says nothing before changed the stream (`streams_equal`)."""
        if self.dense_stream is None:
            self._source, self._target = inputs, self.buffer.tensor()
            return
        self.run.writer.wait()  # the previous commit persists the dense cache, which these outputs overwrite
        store = self.dense_stream
        if index == 0 or streams_equal:
            self._source, self._target = inputs, store.create(index + 1)
        else:
            self._source = store.tensor if store.tensor is not None else store.open(index)
            self._target = store.output_buffer(index + 1)

    def target_through(self, block: nn.Module, layer_kwargs: dict, last: bool) -> None:
        """One dense block applied to the target so far (the first to the start's source); `last`: the
        target is complete after it (a block that a removal kept, after the removed ones before it)."""
        config, device = self.run.config, self.run.device
        written = self.dense_stream.written if self.dense_stream is not None and last else None
        run_windows(block, layer_kwargs, self._source, self._target, config.micro_batch_size, device, written)
        self._source = self._target

    def after_mask(self, index: int, block: nn.Module, matrices: dict[str, Matrix], layer_kwargs: dict,
                   inputs: torch.Tensor) -> dict:
        """Train the pruned block towards its target; what to report for it."""
        run, config = self.run, self.run.config
        trained = trained_parameters(block, matrices, config.recon_norms)
        units = training_units(config.reconstruct, trained, lambda names: modules_in_call_order(
            block, names, lambda: run_windows(block, layer_kwargs, inputs[:1], None, 1, run.device)))
        share = run.ranks.windows(config.nsamples)
        try:
            return reconstruct_block(block, layer_kwargs, inputs, self._target, trained, units, self._dense, config,
                                     run.device, run.ranks, index, share.start, config.nsamples)
        finally:
            self._dense = None

    def next_inputs(self, index: int) -> Callable[[], dict[str, durable.FileRecord]]:
        """The dense stream's outputs of block `index` made the next block's dense inputs (see advance_inputs)."""
        if self.dense_stream is None or index + 1 == self.stages:
            return dict
        return advance_inputs(self.run, index + 1, self.dense_stream)

    def release(self) -> None:
        for holder in (self.buffer, self.dense_stream):
            if holder is not None:
                holder.release()
