"""Whole attention heads, one key/value group at a time (--prune-heads): which rows and columns
hold each group, removing groups (the matrices shrink, the head counts in config.json follow) or
zeroing them (the shapes stay).

Under grouped-query attention, query heads g*r .. g*r + r - 1 share key/value head g (transformers'
`repeat_kv`), so a group is the unit that can go without breaking the model: its r query heads, its
key and value heads, and the r*head_dim columns of the output projection that read them. Every
separate projection of the attention input (q, k, v, and any other, such as a gated query) is laid
out head-major, so group g owns the g-th contiguous 1/G of its rows; the output projection's input
likewise. A fused projection (GPT-2's c_attn, Phi-3's qkv_proj) has no such layout and is refused.
Whether config.json can express the result is asked of transformers (`heads_setting`), not assumed.

A group's score is the sum of the method's neuron scores over the output projection's columns it
owns (Wanda: |W_ij| ||X_j||, FLAP: fluctuation, magnitude: column norms), and the output projection
is refitted on the kept columns exactly as an MLP's output matrix (neurons.refit_output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OffloadPruneError
from ..model.matrices import Matrix, describe, find_matrices
from ..model.skeleton import build_skeleton
from .neurons import MlpUnit, select


@dataclass
class HeadGroups:
    name: str
    inputs: list[Matrix]   # projections of the attention input: rows are head-major
    output: Matrix         # the output projection: columns are head-major
    groups: int            # key/value heads

    @property
    def columns_per_group(self) -> int:
        return self.output.in_features // self.groups

    def rows(self, matrix: Matrix, groups: torch.Tensor) -> torch.Tensor:
        """Rows of an input projection (or, for the output projection, columns) held by these groups."""
        size = (matrix.in_features if matrix is self.output else matrix.out_features) // self.groups
        return (groups[:, None] * size + torch.arange(size, device=groups.device)).reshape(-1)

    def columns(self, groups: torch.Tensor) -> torch.Tensor:
        return self.rows(self.output, groups)

    def scoring_unit(self) -> MlpUnit:
        """The output projection alone, as a unit whose neurons are its input columns."""
        return MlpUnit(self.name, [], self.output)

    def group_scores(self, column_scores: torch.Tensor) -> torch.Tensor:
        return column_scores.reshape(self.groups, self.columns_per_group).sum(1)


def key_value_groups(model_config) -> int:
    heads = model_config.num_attention_heads
    return getattr(model_config, "num_key_value_heads", None) or heads


def head_units(matrices: dict[str, Matrix], groups: int) -> list[HeadGroups]:
    """The attention units among these matrices, each with `groups` key/value groups."""
    units = []
    for output in matrices.values():
        if output.kind != "attention" or output.position != "out":
            continue
        inputs = [m for m in matrices.values() if m.unit == output.unit and m.position == "in"]
        if len(inputs) < 2:
            raise OffloadPruneError(f"--prune-heads: {output.unit} projects queries, keys and values with one fused "
                                    "matrix, whose rows are not laid out by head; not supported")
        if any(m.out_features % groups for m in inputs) or output.in_features % groups:
            raise OffloadPruneError(f"--prune-heads: the matrices of {output.unit} do not split into {groups} "
                                    "key/value groups")
        units.append(HeadGroups(output.unit, inputs, output, groups))
    return units


def kept_groups(groups: int, ratio: float) -> int:
    """(1 - ratio) x groups, rounded, at least one."""
    return max(1, round((1 - ratio) * groups))


def zero_groups(unit: HeadGroups, kept: torch.Tensor) -> None:
    removed = torch.ones(unit.groups, dtype=torch.bool)
    removed[kept] = False
    removed = torch.nonzero(removed).flatten()
    for m in unit.inputs:
        m.weight[unit.rows(m, removed).to(m.weight.device)] = 0
        if m.bias is not None:
            m.bias[unit.rows(m, removed).to(m.bias.device)] = 0
    unit.output.weight[:, unit.columns(removed).to(unit.output.weight.device)] = 0


def shrink_groups(unit: HeadGroups, kept: torch.Tensor) -> None:
    for m in unit.inputs:
        select(m, unit.rows(m, kept), along_rows=True)
    select(unit.output, unit.columns(kept), along_rows=False)


def heads_setting(model_config, ratio: float) -> tuple[dict[str, int], int]:
    """The config.json change that gives every attention layer the kept groups, and the number of
    groups before. Checked by asking transformers: a meta copy of every block with its groups removed
    the way the run removes them must have exactly the parameters transformers builds from the changed
    config, and the model's other parameters and buffers (the rotary tables) must not change."""
    model, _, layers = build_skeleton(model_config)
    groups = key_value_groups(model_config)
    heads = model_config.num_attention_heads
    kept = kept_groups(groups, ratio)
    head_dim = None
    for layer in layers:
        matrices = find_matrices(layer)
        describe(layer, matrices)
        for unit in head_units(matrices, groups):
            head_dim = unit.output.in_features // heads
            shrink_groups(unit, torch.arange(kept))
    if head_dim is None:
        raise OffloadPruneError("--prune-heads: no attention layer found in the blocks")
    settings = model_config.to_dict()
    names = type(model_config).attribute_map
    change = {names.get("num_attention_heads", "num_attention_heads"): heads // groups * kept, "head_dim": head_dim}
    if names.get("num_key_value_heads", "num_key_value_heads") in settings:
        change[names.get("num_key_value_heads", "num_key_value_heads")] = kept
    refusal = OffloadPruneError(
        f"--prune-heads: config.json of {type(model_config).__name__} cannot express {kept} of {groups} key/value "
        f"groups ({heads // groups * kept} query heads of {head_dim} dims); not supported for this architecture")
    try:
        new_model, _, new_layers = build_skeleton(type(model_config).from_dict({**settings, **change}))
    except Exception:
        raise refusal from None
    if any(_shapes(a) != _shapes(b) for a, b in zip(layers, new_layers)) or _outside_shapes(model, layers) != \
            _outside_shapes(new_model, new_layers):
        raise refusal
    return change, groups


def _shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _outside_shapes(model: torch.nn.Module, layers: torch.nn.ModuleList) -> dict[str, tuple]:
    inside = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    return {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in inside}
