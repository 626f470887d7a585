"""The blocks a removal kept, trained to stand in for the removed ones (shortgpt with --reconstruct).

Each removed run of blocks is made up for by the kept block right after it (removed blocks at the end,
by the last kept block). One committed stage per kept block, in order, as the plain copy has:
- the target, from the dense blocks between the previous kept block and this one, then this one (the
  last: then the removed ones after it): `dense-block` runs them on this block's own inputs (the output
  model's hidden states), `dense-stream` on the dense model's hidden states, carried in its second cache;
  each is loaded and released in turn;
- the kept block trained towards that target (reconstruct/, the same training as after a mask: no weight
  is masked here);
- its outputs on its own inputs, as the next kept block's inputs; the block written under its new number.

A kept block with no removed block before it is its own target (`dense-block`), or sees the dense
model's own hidden states (`dense-stream`, until the first removed block): it is copied as it is stored,
untrained.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..model.matrices import find_matrices
from ..model.skeleton import run_windows
from ..runtime.hostmem import release_free_memory
from .output import write_kept_block
from .passes import LAYER_KWARGS, Run, advance_inputs, capture
from .reconstruction import BlockReconstruction


def reconstruct_kept(run: Run, windows: torch.Tensor, kept: list[int]) -> None:
    """Stages from the manifest's completed_blocks on: each kept block trained, propagated, written."""
    state = run.state
    if not state.manifest["captured"]:  # the influence pass released its cache; this pass starts anew
        with run.meter("capture"):
            capture(run, windows)
    layer_kwargs = torch.load(state.dir / LAYER_KWARGS, map_location="cpu", weights_only=False)
    inputs = run.store.open(state.completed_blocks)
    reconstruction = BlockReconstruction(run, run.store.shape, run.store.dtype, stages=len(kept))
    with run.meter("reconstruct"):
        try:
            for new in tqdm(range(state.completed_blocks, len(kept)), desc="blocks kept, trained",
                            disable=run.config.quiet, initial=state.completed_blocks, total=len(kept)):
                last = new + 1 == len(kept)
                span = range(kept[new - 1] + 1 if new > 0 else 0, run.streamed.num_layers if last else kept[new] + 1)
                inputs = _stand_in(run, reconstruction, new, kept[new], span, layer_kwargs, inputs, last)
        finally:
            run.writer.wait()
            reconstruction.release()


def _stand_in(run: Run, reconstruction: BlockReconstruction, new: int, old: int, span: range,
              layer_kwargs: list[dict], inputs: torch.Tensor, last: bool) -> torch.Tensor:
    """Kept block `old`, written as block `new`, trained to stand in for the blocks of `span` (the removed
    ones before it, itself, and for the last kept block the removed ones after it); returns the next kept
    block's inputs."""
    config, streamed, state = run.config, run.streamed, run.state
    removed = [index for index in span if index != old]
    # Until the first removed block both streams are the same: nothing trains, and the dense stream starts
    # at the first gap from the pruned stream's inputs (span[0] == new: no block removed before this span).
    trains = len(removed) > 0 or (config.recon_target == "dense-stream" and old > new)
    block = None
    if trains:
        reconstruction.start_target(new, inputs, streams_equal=span[0] == new)
        for index in span:  # one block at a time; the kept one is read again when blocks after it ran
            loaded = streamed.load_block(index)
            reconstruction.target_through(loaded, layer_kwargs[index], last=index == span[-1])
            if index == old == span[-1]:
                block = loaded
                continue
            streamed.unload_block(index)
            release_free_memory()
    if block is None:
        block = streamed.load_block(old)
    report = None
    if trains:
        matrices = find_matrices(block)
        run.described.describe(block, matrices,
                               lambda: run_windows(block, layer_kwargs[old], inputs[:1], None, 1, run.device))
        report = {**reconstruction.after_mask(new, block, matrices, layer_kwargs[old], inputs),
                  "block_before_removal": old, "stands_in_for": list(removed)}
    if not last:
        run_windows(block, layer_kwargs[old], inputs, run.store.output_buffer(new + 1), config.micro_batch_size,
                    run.device, run.store.written)
    next_inputs = {} if last else advance_inputs(run, new + 1)()
    if trains:
        next_inputs.update(reconstruction.next_inputs(new)())
    # Untrained, or not better trained: the stored bytes, as the plain copy writes them.
    tensors = (streamed.block_tensors(old) if report is not None and report["kept"]
               else run.reader.read(streamed.block_names(old)))
    outputs = write_kept_block(run, old, new, tensors)
    recorded = ({"reconstruction": {**state.manifest.get("reconstruction", {}), str(new): report}}
                if report is not None else {})
    state.commit(outputs=outputs, stage=new, completed_blocks=new + 1,
                 run_files={LAYER_KWARGS: state.run_file_record(LAYER_KWARGS), **next_inputs}, **recorded)
    streamed.unload_block(old)
    release_free_memory()
    return run.store.tensor
