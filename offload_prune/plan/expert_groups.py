"""The plan of a block streamed expert group by expert group (--expert-group-size; stream/expert_blocks.py),
and the group size `auto` chooses.

Such a block holds its core (everything but the routed experts) throughout, one group of experts at a
time, and on the host the experts' inputs recorded for every calibration window. Its prune phase:
- statistics of the core's matrices, the experts' inputs recorded: core, the method's core statistics,
  one micro-batch;
- each group: read (its stored tensors, and their dense copies when the checkpoint stores FP8), its
  statistics fed from the recorded inputs and pruned, its stored copy written behind the next group;
- the block's outputs: the core and one group read back from the output, one micro-batch and its
  per-slot expert outputs (the slots of each token, before they are added);
- the core written as the block's shards.
Its eval phase (perplexity of the output, streamed the same way): the core, one group read and one
micro-batch with its per-slot outputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..basics import OffloadPruneError, format_bytes
from ..config import PruneConfig
from ..disk.durable import DIRECT_STAGING_BYTES
from ..model.expert_groups import experts_module
from ..model.matrices import Matrix

#: Routing weights are float32 in the routers transformers has (softmax or sigmoid in float32).
ROUTING_WEIGHT_BYTES = 4


def experts_numel(block: nn.Module) -> tuple[int, int]:
    """(number of routed experts, parameters of one) of the block's experts module; (0, 0) without one."""
    found = experts_module(block)
    if found is None:
        return 0, 0
    module = found[1]
    count = getattr(module, "num_experts", None) or next(module.parameters()).shape[0]
    return count, sum(p.numel() for p in module.parameters(recurse=False)) // count


def held_numel(block: nn.Module, group_size: int | None) -> int:
    """Parameters of the block loaded at once: all, or its core when its experts stream in groups."""
    count, per_expert = experts_numel(block) if group_size else (0, 0)
    return sum(p.numel() for p in block.parameters()) - count * per_expert


def largest_written(block: nn.Module, group_size: int | None) -> int:
    """Parameters of the largest tensor written at once: a whole parameter, or, of experts streaming in
    groups, one expert's slice."""
    found = experts_module(block) if group_size else None
    experts = {id(p): p for p in found[1].parameters(recurse=False)} if found else {}
    return max(p.numel() // (p.shape[0] if id(p) in experts else 1) for p in block.parameters())


def grouped_prune_steps(config: PruneConfig, model_config, block: nn.Module, chosen: dict[str, Matrix], method,
                        compute: torch.dtype, stored: torch.dtype, fp8: bool, device_type: str, micro_batch: int,
                        ahead: dict, behind: dict) -> dict[str, list[tuple[dict, dict]]]:
    """The prune and eval phases' steps for a block whose experts stream in groups of config.expert_group_size."""
    size = config.expert_group_size
    count, per_expert = experts_numel(block)
    core = held_numel(block, size)
    group = min(size, count) * per_expert
    core_compute, group_compute = core * compute.itemsize, group * compute.itemsize
    # A group read: its stored tensors (FP8 ones and their dense copies), fused into the module's layout.
    group_read = group * stored.itemsize * 2 + (group if fp8 else 0)
    group_written = group * stored.itemsize + (group if fp8 else 0) + DIRECT_STAGING_BYTES
    slots = getattr(model_config, "num_experts_per_tok", 1)
    recorded = config.nsamples * config.seqlen * (model_config.hidden_size * compute.itemsize
                                                  + slots * (8 + ROUTING_WEIGHT_BYTES))
    # The per-slot outputs of one micro-batch, and the copy ordered by expert that is summed.
    slot_outputs = 2 * config.micro_batch_size * config.seqlen * slots * model_config.hidden_size * compute.itemsize
    forward = ({"core_weights": core_compute, "group_weights": group_compute, "micro_batch": micro_batch,
                "slot_outputs": slot_outputs}, {"group_read": group_read})
    core_chosen = {n: m for n, m in chosen.items() if m.expert is None}
    one_group = {n: m for n, m in chosen.items() if m.expert is not None and m.expert < min(size, count)}
    core_method = method.memory_bytes(core_chosen, compute, device_type) if core_chosen else {}
    group_method = method.memory_bytes(one_group, compute, device_type) if one_group else {}
    serialized = largest_written(block, size) * stored.itemsize + DIRECT_STAGING_BYTES
    return {"eval": [({"core_weights": core_compute}, {"stored_core": core * stored.itemsize}), forward], "prune": [
        ({"core_weights": core_compute}, {"stored_core": core * stored.itemsize, **ahead, **behind}),
        ({"core_weights": core_compute, "method_peak": max(core_method.values(), default=0),
          "micro_batch": micro_batch}, {"expert_inputs": recorded, **ahead, **behind}),
        ({"core_weights": core_compute, "group_weights": group_compute,
          "method_peak": max(group_method.values(), default=0), "micro_batch": micro_batch},
         {"expert_inputs": recorded, "group_read": group_read, "group_written": group_written}),
        forward,
        ({"core_weights": core_compute}, {"stored_core": core * stored.itemsize, "serialized_tensor": serialized,
                                          **ahead}),
    ]}


def _rounded_up(size: int) -> int:
    """`size` rounded up to the hundredth of the unit format_bytes prints it in: a budget that fits it."""
    unit = next((u for u in (2**40, 2**30, 2**20, 2**10) if size >= u), 1)
    step = max(1, unit // 100)
    return -(-size // step) * step


def resolve_expert_groups(config: PruneConfig, plan_for: Callable[[PruneConfig], dict],
                          limits: Callable[[dict], tuple[int | None, int | None]]) -> PruneConfig:
    """--expert-group-size auto: whole blocks when their plan fits the device's and the host's `limits(plan)`
    (plan.memory.budgets), else
    the largest group whose plan does; refused, with the smallest budget that would fit, when one expert at
    a time does not. A number is kept. The plans are made with one window per call and the activations on
    disk (the least that can be chosen): the micro-batch and the activation store are chosen afterwards."""
    if config.expert_group_size != "auto":
        return config
    probe = config.replaced(micro_batch_size=1 if config.micro_batch_size == "auto" else config.micro_batch_size,
                            offload_activations="disk" if config.offload_activations == "auto"
                            else config.offload_activations)

    whole = plan_for(probe)
    device_limit, host_limit = limits(whole)

    def fits(plan: dict) -> bool:
        return ((device_limit is None or plan["device"]["peak"] <= device_limit)
                and (host_limit is None or plan["host"]["peak"] <= host_limit))

    if not whole["largest_experts"] or fits(whole):
        return config
    plan = plan_for(probe.replaced(expert_group_size=1))
    if not fits(plan):
        where = "device" if device_limit is not None and plan["device"]["peak"] > device_limit else "host"
        limit = device_limit if where == "device" else host_limit
        needed = format_bytes(_rounded_up(plan[where]["peak"]))
        raise OffloadPruneError(
            f"a whole expert block does not fit, and even one expert at a time needs {needed} of {where} memory "
            f"(in its {plan[where]['phase']} phase), over the {format_bytes(limit)} it may use: give it at least "
            f"{needed}, or fewer --nsamples or a shorter --seqlen")
    low, high = 1, whole["largest_experts"]  # the largest size that fits: a plan grows with its group
    while low < high:
        middle = (low + high + 1) // 2
        if fits(plan_for(probe.replaced(expert_group_size=middle))):
            low = middle
        else:
            high = middle - 1
    return config.replaced(expert_group_size=low)
