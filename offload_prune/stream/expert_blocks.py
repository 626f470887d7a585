"""Blocks pruned expert group by expert group (--expert-group-size; model/expert_groups.py): for a
Mixture-of-Experts block larger than the device.

The block loads without its routed experts. The method's groups run in their order over the core's
matrices, the experts module standing in: it returns zeros (nothing the core's statistics read comes
from the routed experts) and records the experts' inputs where the method's routed matrices need them.
Then each expert group, in turn: loaded, its matrices fed from those recorded inputs as the module's
own forward would feed them, pruned, written as its own shards and committed (a resumed run does not
redo it). Last, the block's outputs: the core's forward with every group streamed in again from what
was written, as the output checkpoint computes them.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..model.expert_groups import ExpertsTakenOver, GroupedBlock, bind_matrices, group_module, recorded_inputs
from ..model.matrices import Matrix, feed_experts
from .output import fp8_stored, fp8_written, read_written
from .passes import Run, collect, counting
from .report import matrix_entries
from .solving import prune_members

#: Manifest field: per block being pruned in groups, the groups already committed.
GROUPS_DONE = "expert_groups_done"
Recorded = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def standing_in(grouped: GroupedBlock, record: Recorded | None = None) -> ExpertsTakenOver:
    return ExpertsTakenOver(grouped.experts.module, recorded_inputs(record))


def prune_in_groups(run: Run, index: int, grouped: GroupedBlock, block: nn.Module, matrices: dict[str, Matrix],
                    chosen: dict[str, Matrix], layer_kwargs: dict, inputs: torch.Tensor,
                    sparsity: float) -> dict[str, dict]:
    """The core's matrices pruned, then every expert group not committed yet pruned and committed; returns
    what to report of the core's matrices."""
    config, method, device = run.config, run.method, run.device
    routed_stage = min((m.stage for m in chosen.values() if m.expert is not None), default=None)
    calibration = method.calibration_passes if method.needs_calibration else 0
    method_info: dict[str, dict] = {}
    pending: list[tuple[list[str], Recorded]] = []  # routed matrices of each method group, with their inputs
    current: Recorded | None = None  # the experts' inputs as the core now makes them
    for names in method.groups(chosen):
        core = {n: chosen[n] for n in names if chosen[n].expert is None}
        routed = [n for n in names if chosen[n].expert is not None]
        record = [] if routed and calibration and current is None else None
        tokens: dict[str, int] = {}
        for calibration_pass in range(calibration if core or record is not None else 0):
            method.start_pass(calibration_pass)
            with standing_in(grouped, record if calibration_pass == 0 else None):
                collect(method, block, core, layer_kwargs, inputs, config, device,
                        tokens if calibration_pass == 0 else None, whole_forward=record is not None)
        current = record if record is not None else current
        if routed:
            pending.append((routed, current))
        if core:
            method_info.update(prune_members(run, core, tokens, sparsity))
            if routed_stage is not None and any(m.stage < routed_stage for m in core.values()):
                current = None  # what feeds the experts changed: a later method group records again
    done = set(run.state.manifest.get(GROUPS_DONE, {}).get(str(index), []))
    for number in range(len(grouped.bounds)):
        if number not in done:
            started = time.perf_counter()
            _prune_group(run, index, grouped, number, matrices, chosen, pending, sparsity)
            run.group_seconds.setdefault(index, []).append(round(time.perf_counter() - started, 3))
    return method_info


def _prune_group(run: Run, index: int, grouped: GroupedBlock, number: int, matrices: dict[str, Matrix],
                 chosen: dict[str, Matrix], pending: list[tuple[list[str], Recorded]], sparsity: float) -> None:
    config, method, device, streamed = run.config, run.method, run.device, run.streamed
    experts = grouped.experts
    first, end = grouped.bounds[number]
    params = grouped.read_group(run.streamed, number, run.reader.read)
    group = group_module(experts.module, params, end - first)
    bound = bind_matrices(matrices, group, first, end)
    info: dict[str, dict] = {}
    for names, recorded in pending:
        members = {n: chosen[n] for n in names if n in bound}
        if not members:
            continue
        by_expert: dict[int, list[Matrix]] = {}
        for matrix in members.values():
            by_expert.setdefault(matrix.expert, []).append(matrix)
        tokens: dict[str, int] = {}
        for calibration_pass in range(method.calibration_passes if method.needs_calibration else 0):
            method.start_pass(calibration_pass)
            feed = counting(method, tokens if calibration_pass == 0 else None)
            for hidden, routing, weights in recorded:
                feed_experts(group, by_expert, feed, method.weights_by_router, hidden.to(device),
                             routing.to(device), weights.to(device), first)
        info.update(prune_members(run, members, tokens, sparsity))
    prefix = streamed.block_prefix(index)
    modules, unpruned = matrix_entries(prefix, bound, chosen, method.rule, info, config.nm,
                                       lambda m: streamed.stored_dtype(prefix, m))
    dense = experts.to_checkpoint(streamed, {name: p.detach() for name, p in group._parameters.items()
                                             if name in params}, first, end)
    tensors = fp8_stored(fp8_written(run.reader, config),
                         {name: t.to("cpu", run.reader.dtypes[name]) for name, t in dense.items()})
    for matrix in bound.values():  # the group's memory goes when it is committed, not with the block
        matrix.weight, matrix.module = matrix.weight.to("meta"), experts.module
        matrix.bias = matrix.bias.to("meta") if matrix.bias is not None else None
    del group, params, dense
    state = run.state

    def commit_group() -> None:
        outputs = run.layout.write_unit(run.layout.group_units[index][number], state.save, tensors)
        done = {**state.manifest.get(GROUPS_DONE, {})}
        done[str(index)] = sorted({*done.get(str(index), []), number})
        state.commit(outputs=outputs, stage=index, modules={**state.modules, **modules},
                     unpruned={**state.manifest["unpruned"], **unpruned}, **{GROUPS_DONE: done})

    if run.ranks.lead:
        run.writer.submit(commit_group)


def streaming_written(run: Run, grouped: GroupedBlock) -> ExpertsTakenOver:
    """The experts module computing from every group as written (the writer is waited for first)."""
    run.writer.wait()
    return grouped.streaming(run.streamed, lambda names: read_written(run, names))
