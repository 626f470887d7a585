"""A Mixture-of-Experts block whose routed experts come to the device a group at a time.

DeepSeek-V3's expert block holds 11.3 B parameters (22.5 GB in bf16): it does not fit a 24 GB card
with room to work. Its experts are independent given the router's choice, so the block runs with
everything but the routed experts loaded (the "core": attention, router, shared experts), and the
experts module's forward is taken over: a group of consecutive experts is read from its own
checkpoint tensors, fused by transformers' own conversion as the whole block would be, and run on
the tokens routed to it by a copy of the experts module that holds only that group.

The result is the whole module's to the bit. Its eager forward multiplies each expert's rows in one
matrix product and adds the products into zeros, expert after expert; here each group's forward makes
the products of its experts' rows (the same rows, in the same order: the same results), kept per
routing slot, and once every group has run each token's slots are added in the order of their experts.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..basics import OffloadPruneError
from ..disk.tensormap import Group
from .matrices import Matrix, is_experts
from .skeleton import StreamedModel

#: The experts implementation the stream computes with (skeleton.py sets it): transformers' own loop over experts (each expert's
#: rows one matrix product, added into the output expert after expert), whose result does not depend on
#: which other experts are in memory (grouped_mm's CPU kernel shares its threads by the whole batch).
STREAM_EXPERTS = "eager"


def experts_module(block: nn.Module) -> tuple[str, nn.Module] | None:
    """(path in the block, module) of the block's one experts module; None when it has none."""
    found = [(path, module) for path, module in block.named_modules() if is_experts(module)]
    if len(found) > 1:
        raise OffloadPruneError(f"a block with {len(found)} experts modules ({found[0][0]}, {found[1][0]}): expert "
                                "groups stream one experts module per block")
    return found[0] if found else None


def group_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """[first, end) of each group of `size` consecutive experts (the last may be smaller)."""
    return [(first, min(first + size, count)) for first in range(0, count, size)]


@dataclass
class BlockExperts:
    """The routed experts of one block, as checkpoint tensors and as the slices of the module's fused
    parameters they load into."""
    path: str                   # in the block: `mlp.experts`
    module: nn.Module
    count: int
    params: list[str]           # the fused parameters' full names (`model.layers.3.mlp.experts.gate_up_proj`)
    groups: list[Group]         # the conversion of each from its per-expert checkpoint tensors
    per_expert: list[int]       # checkpoint tensors per expert in each conversion

    @classmethod
    def of(cls, streamed: StreamedModel, index: int) -> "BlockExperts | None":
        found = experts_module(streamed.layers[index])
        if found is None:
            return None
        path, module = found
        prefix = streamed.block_prefix(index) + path + "."
        names = [prefix + name for name, _ in module.named_parameters(recurse=False)]
        groups = list({id(g): g for g in (streamed.tensormap.group_of[n] for n in names)}.values())
        count = getattr(module, "num_experts", None)
        implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
        if count is None or implementation != STREAM_EXPERTS:
            raise OffloadPruneError(f"{type(module).__name__} (experts implementation {implementation!r}) cannot be "
                                    f"streamed in expert groups: only transformers' {STREAM_EXPERTS} experts are")
        per_expert = []
        for group in groups:
            if group.converter is None or len(group.sources) % count:
                raise OffloadPruneError(f"{group.sources[0]} holds the experts of {prefix[:-1]} fused in one "
                                        "tensor: expert groups need one checkpoint tensor per expert")
            per_expert.append(len(group.sources) // count)
        return cls(path, module, count, names, groups, per_expert)

    def sources(self, first: int, end: int) -> list[str]:
        """The checkpoint tensors of experts [first, end). Sources sort by expert (natural order), each
        expert's together."""
        return [s for g, k in zip(self.groups, self.per_expert) for s in g.sources[first * k:end * k]]

    def _subgroup(self, group: Group, k: int, first: int, end: int) -> Group:
        return Group(group.sources[first * k:end * k], group.patterns[first * k:end * k], group.converter,
                     group.target, params={p: (end - first, *shape[1:]) for p, shape in group.params.items()})

    def to_group_params(self, streamed: StreamedModel, tensors: dict[str, torch.Tensor], first: int,
                        end: int) -> dict[str, torch.Tensor]:
        """Checkpoint tensors of experts [first, end) -> the module's parameters for those experts only
        ({leaf name: [end - first, ...]}), through transformers' conversion."""
        out = {}
        for group, k in zip(self.groups, self.per_expert):
            sub = self._subgroup(group, k, first, end)
            for name, value in streamed.tensormap.to_params([sub], {s: tensors[s] for s in sub.sources}).items():
                out[name.rsplit(".", 1)[1]] = value
        return out

    def to_checkpoint(self, streamed: StreamedModel, params: dict[str, torch.Tensor], first: int,
                      end: int) -> dict[str, torch.Tensor]:
        """The group's parameters back under the checkpoint's own names of experts [first, end)."""
        out = {}
        for group, k in zip(self.groups, self.per_expert):
            sub = self._subgroup(group, k, first, end)
            back = streamed.tensormap.to_checkpoint([sub], {p: params[p.rsplit(".", 1)[1]] for p in sub.params})
            # The reverse conversion numbers the group's experts from 0: each renamed to its own source.
            local = sorted(back, key=_natural_key)
            if len(local) != len(sub.sources):
                raise OffloadPruneError(f"{group.target}: the reverse conversion of experts {first}-{end - 1} gives "
                                        f"{len(local)} tensors for {len(sub.sources)}")
            out.update({source: back[name] for name, source in zip(local, sorted(sub.sources, key=_natural_key))})
        return out


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def group_module(module: nn.Module, params: dict[str, torch.Tensor], count: int) -> nn.Module:
    """A copy of the experts module holding `count` experts: `params` in place of its fused parameters."""
    group = copy.copy(module)
    group.__dict__.pop("forward", None)  # the module's own forward, not one standing in for it
    group._parameters = {**module._parameters,
                         **{name: nn.Parameter(value, requires_grad=False) for name, value in params.items()}}
    group.num_experts = count
    return group


def bind_matrices(matrices: dict[str, Matrix], group: nn.Module, first: int, end: int) -> dict[str, Matrix]:
    """The block's expert matrices of experts [first, end), pointed at the group module's slices (their
    weights were meta views of the whole module's parameters); returns them."""
    bound = {}
    for name, matrix in matrices.items():
        if matrix.expert is None or not first <= matrix.expert < end:
            continue
        param = name.rsplit(".", 1)[1]
        stored = getattr(group, param)[matrix.expert - first]
        matrix.weight = stored.t() if group.is_transposed else stored
        if group.has_bias:
            matrix.bias = getattr(group, f"{param}_bias")[matrix.expert - first]
        matrix.module = group
        bound[name] = matrix
    return bound


@torch.no_grad()
def group_slot_outputs(group: nn.Module, first: int, hidden: torch.Tensor, index: torch.Tensor,
                       weights: torch.Tensor, out: torch.Tensor) -> None:
    """Fill `out` [tokens, slots, hidden] at the routing slots that chose one of this group's experts
    (numbered from `first`) with those slots' weighted expert outputs, as the module computes them: one
    slot per row, the rows of each expert in the order its forward takes them (slot, then token)."""
    local = index - first
    slot, token = torch.where(((local >= 0) & (local < group.num_experts)).T)
    if token.numel() == 0:
        return
    out[token, slot] = group(hidden[token], local[token, slot][:, None], weights[token, slot][:, None])


class StreamedExperts:
    """Stands in for a block's experts module while its groups stream: `load(g)` gives group g's
    parameters on the device; each call runs every group on the tokens routed to it, then adds each
    token's slots in the order of their experts, as the module's eager forward adds them (index_add_,
    expert after expert, into zeros)."""

    def __init__(self, module: nn.Module, bounds: list[tuple[int, int]],
                 load: Callable[[int], dict[str, torch.Tensor]]):
        self.module, self.bounds, self.load = module, bounds, load

    def __call__(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        slots = torch.zeros(*index.shape, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        for g, (first, end) in enumerate(self.bounds):
            group_slot_outputs(group_module(self.module, self.load(g), end - first), first, hidden, index, weights,
                               slots)
        by_expert = slots.gather(1, index.argsort(dim=1)[..., None].expand_as(slots))
        total = torch.zeros_like(hidden)
        for k in range(by_expert.shape[1]):
            total += by_expert[:, k]
        return total


class ExpertsTakenOver:
    """Within `with`, the experts module's forward is `forward` (hooks still run around it)."""

    def __init__(self, module: nn.Module, forward: Callable):
        self.module, self.forward = module, forward

    def __enter__(self) -> None:
        self.module.forward = self.forward

    def __exit__(self, *exc) -> None:
        del self.module.forward


def recorded_inputs(record: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None) -> Callable:
    """An experts forward for the passes that do not need the routed experts' output (statistics of the
    core's matrices, which nothing routed feeds): it returns zeros and, given `record`, keeps each call's
    (hidden states, routing indices, routing weights) on the host."""
    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if record is not None:
            record.append((hidden.detach().cpu(), index.detach().cpu(), weights.detach().cpu()))
        return torch.zeros_like(hidden)
    return forward


@dataclass
class GroupedBlock:
    """A block whose routed experts stream in groups: its experts, and [first, end) of each group."""
    experts: BlockExperts
    bounds: list[tuple[int, int]]

    def names(self) -> list[list[str]]:
        """The checkpoint tensors of each group."""
        return [self.experts.sources(first, end) for first, end in self.bounds]

    def read_group(self, streamed: StreamedModel, number: int,
                   read: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Group `number`'s parameters on the compute device, from the checkpoint tensors `read` gives."""
        first, end = self.bounds[number]
        params = self.experts.to_group_params(streamed, read(self.experts.sources(first, end)), first, end)
        return {name: value.to(streamed.device, streamed.dtype if value.is_floating_point() else None)
                for name, value in params.items()}

    def streaming(self, streamed: StreamedModel, read: Callable[[list[str]], dict[str, torch.Tensor]]
                  ) -> ExpertsTakenOver:
        """Within `with`, the experts module computes from every group, each read by `read` when its turn comes."""
        load = lambda number: self.read_group(streamed, number, read)  # noqa: E731
        return ExpertsTakenOver(self.experts.module, StreamedExperts(self.experts.module, self.bounds, load))


def grouped_blocks(streamed: StreamedModel, size: int | None) -> dict[int, GroupedBlock]:
    """Every block with routed experts, in groups of `size` (refused above the number of experts), held back
    from the block's load; none when `size` is None."""
    grouped = {}
    for index in range(streamed.num_layers) if size else ():
        experts = BlockExperts.of(streamed, index)
        if experts is None:
            continue
        if size > experts.count:
            raise OffloadPruneError(f"--expert-group-size {size} is more than the {experts.count} experts of block "
                                    f"{index}")
        grouped[index] = GroupedBlock(experts, group_bounds(experts.count, size))
        streamed.hold_back(index, experts.params)
    return grouped


def streamed_forward(grouped: dict[int, GroupedBlock], streamed: StreamedModel, index: int):
    """The context a forward-only pass runs block `index` in: its experts streamed from the checkpoint the
    model reads, group by group, when the block is grouped."""
    return grouped[index].streaming(streamed, streamed.reader.read) if index in grouped else contextlib.nullcontext()
