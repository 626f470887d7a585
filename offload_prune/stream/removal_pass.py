"""A run that removes whole blocks (ShortGPT): each block's influence from a dense pass, the blocks
to remove, then the others copied unchanged under their new numbers (or, with --reconstruct, trained to
stand in for the removed ones: kept_blocks.py), one committed stage per block. The measures and the
config surgery are block_removal.py's."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..disk import durable
from ..surgery.block_removal import (AngularWindow, InfluenceMeter, contiguous_run, lowest_influence,
                                     removal_for_budget)
from .output import fp8_written, output_config, output_layout, write_kept_block
from .kept_blocks import reconstruct_kept
from .passes import Run, capture, dense_pass

ANGULAR_STATES = "angular_{:05d}.pt"  # last-token states of the latest block boundaries (shortgpt --angular)


def remove_blocks(run: Run, windows: torch.Tensor) -> None:
    state, meter, streamed = run.state, run.meter, run.streamed
    if state.manifest["removed_blocks"] is None:
        if not state.manifest["captured"]:
            with meter("capture"):
                capture(run, windows)
        with meter("influence"):
            measured = dense_pass(run, "influence", "shortgpt: block influence", _start_influence)
        influence = [m["influence"] for m in measured]
        if run.config.angular:
            removed = contiguous_run(_angular_by_start(run), run.config.blocks_to_remove)
        elif run.config.param_budget is None:
            removed = lowest_influence(influence, run.config.blocks_to_remove)
        else:
            removed = removal_for_budget(influence, [_block_params(run, i) for i in range(streamed.num_layers)],
                                         sum(math.prod(shape) for shape in run.reader.shapes.values()),
                                         run.config.param_budget)
        output_config(run, removed)  # refuses here, before any output, if config.json cannot say it
        run.store.release()
        state.commit(run_files={}, removed_blocks=removed, captured=False)
    kept = _kept_blocks(run)
    run.layout = output_layout(streamed, run.head, kept, fp8=fp8_written(run.reader, run.config))
    if state.completed_blocks < len(kept) and run.config.reconstruct != "off":
        reconstruct_kept(run, windows, kept)
    elif state.completed_blocks < len(kept):
        with meter("copy"):
            for new in tqdm(range(state.completed_blocks, len(kept)), desc="blocks kept", disable=run.config.quiet,
                            initial=state.completed_blocks, total=len(kept)):
                old = kept[new]
                outputs = write_kept_block(run, old, new, run.reader.read(streamed.block_names(old)))
                state.commit(outputs=outputs, stage=new, completed_blocks=new + 1)


def _kept_blocks(run: Run) -> list[int]:
    removed = set(run.state.manifest["removed_blocks"] or ())
    return [i for i in range(run.streamed.num_layers) if i not in removed]


def _block_params(run: Run, index: int) -> int:
    return sum(math.prod(run.reader.shapes[name]) for name in run.streamed.block_names(index))


def _start_influence(run: Run, index: int, block: nn.Module, layer_kwargs: dict, inputs: torch.Tensor):
    meter = InfluenceMeter()

    def result() -> tuple[dict, dict]:
        measured = meter.result()
        if not run.config.angular:
            return measured, {}
        states = (torch.load(run.state.dir / ANGULAR_STATES.format(index - 1), weights_only=True)
                  if index > 0 else {})
        window = AngularWindow(run.config.blocks_to_remove, states)
        measured["angular"] = window.advance(index, torch.cat(meter.last_in), torch.cat(meter.last_out))
        name = ANGULAR_STATES.format(index)
        return measured, {name: durable.write_file(run.state.dir / name, lambda tmp: torch.save(window.states, tmp))}

    return [meter.attach(block)], result


def _angular_by_start(run: Run) -> list[float | None]:
    """Angular distance of removing blocks l .. l + n - 1, by l (measured when block l + n - 1 ran)."""
    measured, span = run.state.manifest["influence"], run.config.blocks_to_remove
    return [measured[start + span - 1]["angular"] for start in range(len(measured) - span + 1)]


def removal_report(run: Run) -> dict:
    """The report's account of the removal: each block's influence, the blocks removed, sizes before and after."""
    removed, measured = run.state.manifest["removed_blocks"], run.state.manifest["influence"]
    total = sum(math.prod(shape) for shape in run.reader.shapes.values())
    return {"influence": [m["influence"] for m in measured], "removed": removed,
            "blocks_before": run.streamed.num_layers, "blocks_after": run.streamed.num_layers - len(removed),
            "params_before": total, "params_after": total - sum(_block_params(run, i) for i in removed),
            "rule": "angular distance" if run.config.angular else "block influence",
            **({"angular_distance": _angular_by_start(run)} if run.config.angular else {})}
