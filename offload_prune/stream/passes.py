"""The phases' common ground: the `Run` every phase is handed, and the calibration windows' way
through the blocks (layer-0 inputs captured, a block's outputs handed on as the next block's inputs,
a dense pass measuring each block, a method's statistics collected), each step committed so that a
crash resumes at the next block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..disk import durable
from ..disk.checkpoint import CheckpointReader, ShardLayout
from ..disk.runstate import RunState
from ..methods import PruningMethod
from ..model.lm_head import LmHead
from ..model.matrices import DescribedBlocks, Matrix, observe
from ..model.skeleton import StreamedModel, run_windows
from ..runtime.activations import ActivationStore
from ..runtime.distributed import Ranks
from ..runtime.hostmem import release_free_memory
from ..runtime.overlap import Behind
from ..runtime.meter import PhaseMeter

LAYER_KWARGS = "layer_kwargs.pt"


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
    head: LmHead | None
    meter: PhaseMeter
    given_sparsities: list[float] | None  # per block, before any block is pruned (None: OWL measures them)
    config_changes: dict  # settings of the output's config.json known before the run (the shrunk MLP width)
    writer: Behind  # writes and commits a pruned block while the next one computes
    ranks: Ranks  # the torchrun processes sharing the calibration windows (one by default)
    described: DescribedBlocks = field(default_factory=DescribedBlocks)  # roles probed once per kind of block
    expert_groups: dict = field(default_factory=dict)  # block -> its GroupedBlock, streamed in expert groups
    group_seconds: dict = field(default_factory=dict)  # block -> seconds each expert group this process pruned took

    def block_sparsity(self, index: int) -> float:
        return (self.given_sparsities or self.state.manifest["layer_sparsity"])[index]


def capture(run: Run, windows: torch.Tensor) -> None:
    """Layer-0 inputs of every calibration window and each layer's keyword arguments, made durable.
    The keyword arguments are kept on the CPU, so a resume may compute on another device."""
    run.streamed.load_outside(with_head=False)
    layer0_inputs = run.store.create(0)
    layer_kwargs = run.streamed.capture_into(windows, layer0_inputs, run.config.quiet, "calibration: embed",
                                             run.store.written)
    run.streamed.unload_outside()
    on_cpu = send_to_device(layer_kwargs, "cpu")
    inputs = advance_inputs(run, 0)()
    kwargs_record = (durable.write_file(run.state.dir / LAYER_KWARGS, lambda tmp: torch.save(on_cpu, tmp))
                     if run.ranks.lead else None)
    run.state.commit(run_files={LAYER_KWARGS: kwargs_record, **inputs}, captured=True)
    run.ranks.barrier()  # every rank reads the keyword arguments rank 0 wrote


def advance_inputs(run: Run, index: int, store: ActivationStore | None = None
                   ) -> Callable[[], dict[str, durable.FileRecord]]:
    """The outputs just made become the inputs of block `index` (in `store`, the run's activation cache by
    default); returns what makes them durable and names them for the manifest. In one process it does so
    when called (on the writer thread, maybe). Across ranks every rank persists its share now, after a
    barrier (rank 0's previous commit is over: it deletes the run files it does not name), and rank 0
    names them all."""
    store = store or run.store
    persist = store.advance()
    if run.ranks.world == 1:
        return lambda: {store.name(index): persist(index)}
    run.ranks.barrier()
    records = dict(run.ranks.gather((store.name(index), persist(index))))
    return lambda: records


def dense_pass(run: Run, key: str, desc: str, start_measuring) -> list[dict]:
    """The calibration windows through the dense blocks, one measurement per block (manifest field
    `key`), committed block by block like the pruning pass: a crash resumes at the next block.
    `start_measuring(run, index, block, layer_kwargs, inputs)` hooks the block and returns the hooks
    and a function giving, once the windows have run, the block's measurement and any run files
    (name: record) it wrote for the blocks after it."""
    config, state, streamed = run.config, run.state, run.streamed
    measured = state.manifest[key]
    layer_kwargs = torch.load(state.dir / LAYER_KWARGS, map_location="cpu", weights_only=False)
    inputs = run.store.open(len(measured)) if len(measured) < streamed.num_layers else None  # None: all measured
    for index in tqdm(range(len(measured), streamed.num_layers), desc=desc, disable=config.quiet,
                      initial=len(measured), total=streamed.num_layers):
        block = streamed.load_block(index)
        handles, result = start_measuring(run, index, block, layer_kwargs[index], inputs)
        last = index + 1 == streamed.num_layers
        try:
            run_windows(block, layer_kwargs[index], inputs, None if last else run.store.output_buffer(index + 1),
                        config.micro_batch_size, run.device, run.store.written)
        finally:
            for handle in handles:
                handle.remove()
        measurement, extra_files = result()
        measured = [*measured, measurement]
        run_files = {LAYER_KWARGS: state.run_file_record(LAYER_KWARGS), **extra_files}
        if not last:
            run_files.update(advance_inputs(run, index + 1)())
        state.commit(run_files=run_files, **{key: measured})
        streamed.unload_block(index)
        release_free_memory()
        inputs = run.store.tensor
    return measured


def counting(method, tokens: dict[str, int] | None) -> Callable[[str, torch.Tensor, torch.Tensor], None]:
    """The method's add_batch, counting in `tokens` (when given) the tokens each matrix saw."""
    def observe_batch(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if tokens is not None:
            tokens[name] = tokens.get(name, 0) + x.numel() // x.shape[-1]
        method.add_batch(name, x, y)
    return observe_batch


def collect(method, block: nn.Module, matrices: dict[str, Matrix], kwargs: dict, inputs: torch.Tensor,
             config: PruneConfig, device: torch.device, tokens: dict[str, int] | None = None,
             whole_forward: bool = False) -> None:
    """One pass of the calibration windows through the block with the method's statistics hooked in;
    `tokens` (when given) counts the tokens each matrix saw (an expert: those routed to it). The forward
    stops once the last matrix has its input, where the method reads no outputs, unless `whole_forward`."""
    handles = observe(matrices, counting(method, tokens), method.weights_by_router,
                      inputs_only=not method.reads_outputs and not whole_forward)
    try:
        run_windows(block, kwargs, inputs, None, config.micro_batch_size, device)
    finally:
        for handle in handles:
            handle.remove()
