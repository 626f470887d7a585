"""Every weight matrix of a decoder block, whatever module holds it, and what role it plays.

A method prunes `Matrix` objects: an [out, in] view of the stored parameter (in-place writes reach
it), so `nn.Linear`, GPT-2's `Conv1D` (stored [in, out]) and one expert of a fused 3-D experts
parameter look the same. Experts are described by transformers' own experts interface
(`use_experts_implementation`: `is_transposed`, `has_bias`, `has_gate`, `_apply_gate`), so each
expert's inputs are computed from the tokens its router sends it, the way the model computes them.

Roles come from the block's own forward on one calibration window (`describe`):
- attention: matrices inside the submodule the block hands the attention mask to;
- router: matrices owned directly by the module that holds the experts (the router, a shared
  expert's one-output gate);
- mlp: every other matrix (gate/up/down, fc1/fc2, c_fc/c_proj, experts, shared experts).
Within its unit (the attention module, an MLP, one expert) the matrix called last writes the
unit's output ("out": its columns are the neurons); the others read the unit's input ("in": rows
are neurons). Matrices reading the same tensor form one stage; stages run in call order.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(eq=False)
class Matrix:
    name: str                       # inside the block: `self_attn.q_proj`, `mlp.experts.17.down_proj`
    weight: torch.Tensor            # [out, in] view of the stored parameter
    bias: torch.Tensor | None
    module: nn.Module               # whose forward reads the input (for an expert: the experts module)
    expert: int | None = None
    kind: str = "mlp"               # attention | mlp | router
    position: str = "in"            # in: rows are the unit's neurons; out: columns are
    unit: str = ""
    stage: int = 0                  # call order of the group of matrices reading the same input
    interleaved: bool = False       # fused rows ordered [gate0, up0, gate1, ...] instead of [gate.., up..]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def is_experts(module: nn.Module) -> bool:
    """Declared through transformers' experts interface."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "down_proj")


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def expert_params(module: nn.Module) -> list[str]:
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def find_matrices(block: nn.Module) -> dict[str, Matrix]:
    """Every weight matrix of the block, in definition order (experts one by one). Weights of other
    shapes (a convolution, experts that do not declare their layout) are not pruned; `other_weights`
    finds them for the totals."""
    conv1d = _conv1d_class()
    found: dict[str, Matrix] = {}
    inside_experts: list[str] = []
    for path, module in block.named_modules():
        if any(path.startswith(e + ".") for e in inside_experts):
            continue
        if is_experts(module):
            inside_experts.append(path)
            for param in expert_params(module):
                stored = getattr(module, param)
                bias = getattr(module, f"{param}_bias", None) if module.has_bias else None
                for e in range(stored.shape[0]):
                    weight = stored[e].t() if module.is_transposed else stored[e]
                    found[f"{path}.{e}.{param}"] = Matrix(
                        f"{path}.{e}.{param}", weight, bias[e] if bias is not None else None, module, expert=e,
                        interleaved=param != "down_proj" and not getattr(module, "is_concatenated", True))
            continue
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        view = weight.t() if isinstance(module, conv1d) else weight
        found[path] = Matrix(path, view, module._parameters.get("bias"), module)
    return found


def other_weights(block: nn.Module, matrices: dict[str, Matrix]) -> dict[str, torch.Tensor]:
    """Parameters of two or more dimensions that are not one of `matrices` (nor an expert's bias):
    weights no method prunes here, which the totals must still count."""
    covered = {id(m.module) for m in matrices.values()}
    return {f"{path}.{name}" if path else name: param for path, module in block.named_modules()
            if id(module) not in covered and not isinstance(module, nn.Embedding)
            for name, param in module.named_parameters(recurse=False) if param.dim() >= 2}


# -- roles -------------------------------------------------------------------------------------
def describe(block: nn.Module, matrices: dict[str, Matrix], probe: Callable[[], None] | None = None) -> bool:
    """Set kind, unit, position and stage of every matrix. `probe` runs the block's forward once
    (one calibration window); without it (the memory plan, on meta tensors) definition order and
    names stand in for the call order and the attention module. Returns whether a probe saw every
    matrix called (experts: their module), so that what was found follows from the block's code alone."""
    paths = {module: path for path, module in block.named_modules()}
    order: list[str] = []             # matrix names by first call
    inputs: dict[str, int] = {}       # matrix name -> index of the input tensor it read
    attention: set[str] = set()
    if probe is not None:
        order, inputs, attention = _observe_calls(block, matrices, paths, probe)
    called = set(order)
    every_call_seen = probe is not None and all(
        (paths[m.module] if m.expert is not None else m.name) in called for m in matrices.values())
    if not order:
        order = list(matrices)
    if not attention:
        attention = {p for p in paths.values() if p and _named_attention(p.rsplit(".", 1)[-1])}
    experts_paths = {paths[m.module] for m in matrices.values() if m.expert is not None}
    moe_blocks = {p.rsplit(".", 1)[0] if "." in p else "" for p in experts_paths}
    for matrix in matrices.values():
        owner = matrix.name if matrix.expert is None else paths[matrix.module]
        parent = owner.rsplit(".", 1)[0] if "." in owner else ""
        attn = next((a for a in sorted(attention, key=len) if owner.startswith(a + ".")), None)
        if matrix.expert is not None:
            matrix.kind, matrix.unit = "mlp", f"{owner}.{matrix.expert}"
        elif attn is not None:
            matrix.kind, matrix.unit = "attention", attn
        elif parent in moe_blocks:
            matrix.kind, matrix.unit = "router", parent
        else:
            matrix.kind, matrix.unit = "mlp", parent
    rank = {name: i for i, name in enumerate(order)}
    last_of_unit: dict[str, str] = {}
    for matrix in sorted(matrices.values(), key=lambda m: _call_rank(m, rank, paths)):
        if matrix.kind != "router":
            last_of_unit[matrix.unit] = matrix.name
    for matrix in matrices.values():
        matrix.position = "out" if last_of_unit.get(matrix.unit) == matrix.name and _unit_size(matrices, matrix) > 1 \
            else "in"
    if probe is None:  # stand-in for the inputs: a unit's "in" matrices read the same tensor
        inputs = {m.name: (m.unit, "in") for m in matrices.values() if m.position == "in" and m.kind != "router"}
    _assign_stages(matrices, rank, inputs, paths)
    return every_call_seen


class DescribedBlocks:
    """`describe` once per kind of block. A block whose module paths and classes and whose matrices'
    names and shapes equal those of a block probed before takes that block's roles and stages without
    a probe of its own (one calibration window through the block: with few windows, a good part of
    the block's compute). Only a probe that saw every matrix called is reused: where calls depend on
    the input (experts as separate modules, some routed no token) each block is probed."""

    def __init__(self) -> None:
        self._roles: dict[tuple, dict[str, tuple[str, str, str, int]]] = {}

    def describe(self, block: nn.Module, matrices: dict[str, Matrix], probe: Callable[[], None]) -> None:
        key = (tuple((path, type(module)) for path, module in block.named_modules()),
               tuple((name, tuple(m.weight.shape), m.expert) for name, m in matrices.items()))
        roles = self._roles.get(key)
        if roles is None:
            if describe(block, matrices, probe):
                self._roles[key] = {name: (m.kind, m.unit, m.position, m.stage) for name, m in matrices.items()}
            return
        for name, matrix in matrices.items():
            matrix.kind, matrix.unit, matrix.position, matrix.stage = roles[name]


def _named_attention(leaf: str) -> bool:
    return "attn" in leaf.lower() or "attention" in leaf.lower()


def _unit_size(matrices: dict[str, Matrix], matrix: Matrix) -> int:
    return sum(1 for m in matrices.values() if m.unit == matrix.unit and m.kind != "router")


def _call_rank(matrix: Matrix, rank: dict[str, int], paths: dict) -> tuple[float, int]:
    """Experts run where their module runs; within an expert, the first projection before down_proj."""
    if matrix.expert is None:
        return rank.get(matrix.name, len(rank)), 0
    return rank.get(paths[matrix.module], len(rank)), 1 + (matrix.name.endswith("down_proj"))


def _assign_stages(matrices: dict[str, Matrix], rank: dict[str, int], inputs: dict, paths: dict) -> None:
    stage, previous_key = -1, None
    for matrix in sorted(matrices.values(), key=lambda m: _call_rank(m, rank, paths)):
        if matrix.expert is not None:
            key = ("experts", matrix.name.endswith("down_proj"))     # all experts' same projection together
        else:
            key = ("input", inputs.get(matrix.name, matrix.name))    # matrices reading one tensor together
        if key != previous_key:
            stage += 1
            previous_key = key
        matrix.stage = stage


def _observe_calls(block, matrices, paths, probe):
    order: list[str] = []
    seen_inputs: list[torch.Tensor] = []   # kept alive so identities stay unique during the probe
    inputs: dict[str, int] = {}
    attention: set[str] = set()
    by_module = {m.module: m.name for m in matrices.values() if m.expert is None}
    experts = {m.module for m in matrices.values() if m.expert is not None}

    def pre(module, args, kwargs):
        path = paths[module]
        if "attention_mask" in kwargs and path and not any(path.startswith(a + ".") for a in attention):
            attention.add(path)
        if module in experts and path not in order:
            order.append(path)
        if module in by_module and by_module[module] not in order:
            name = by_module[module]
            order.append(name)
            x = args[0] if args else next(iter(kwargs.values()))
            index = next((i for i, t in enumerate(seen_inputs) if t is x), None)
            if index is None:
                seen_inputs.append(x)
                index = len(seen_inputs) - 1
            inputs[name] = index

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in block.modules() if m is not block]
    try:
        probe()
    finally:
        for handle in handles:
            handle.remove()
    return order, inputs, attention


# -- statistics ----------------------------------------------------------------------------------
Observe = Callable[[str, torch.Tensor, torch.Tensor], None]


class BlockStopped(Exception):
    """Raised in a block's forward once every observed matrix has seen its input: the rest is not needed."""


def observe(matrices: dict[str, Matrix], callback: Observe, weight_by_router: bool, inputs_only: bool = False) -> list:
    """Hooks that hand `callback(name, inputs, outputs)` each matrix's inputs on every forward. An
    expert sees only the tokens routed to it; with `weight_by_router` each token's input (and output)
    is scaled by the router weight that multiplies the expert's output for it. With `inputs_only` (the
    callback reads no outputs: it gets None) the block's forward stops with BlockStopped when the last
    stage's input arrives, before that stage and what follows it compute, where the matrices allow it
    (plain linear layers). Returns the handles."""
    handles = []
    last = _last_stage(matrices) if inputs_only else []
    if last:
        def stop(module, args):
            for matrix in last:  # one stage: they all read this tensor
                callback(matrix.name, args[0], None)
            raise BlockStopped
        handles += [matrix.module.register_forward_pre_hook(stop) for matrix in last]
    plain = {m.module: m for m in matrices.values() if m.expert is None and m not in last}

    def plain_hook(matrix: Matrix):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):  # a router returns (logits, weights, indices)
                output = nn.functional.linear(args[0], matrix.weight, matrix.bias)
            callback(matrix.name, args[0], output)
        return hook

    for module, matrix in plain.items():
        handles.append(module.register_forward_hook(plain_hook(matrix)))
    by_experts: dict[nn.Module, dict[int, list[Matrix]]] = {}
    for matrix in matrices.values():
        if matrix.expert is not None:
            by_experts.setdefault(matrix.module, {}).setdefault(matrix.expert, []).append(matrix)
    for module, experts in by_experts.items():
        handles.append(module.register_forward_pre_hook(_expert_hook(module, experts, callback, weight_by_router),
                                                        with_kwargs=True))
    return handles


def _last_stage(matrices: dict[str, Matrix]) -> list[Matrix]:
    """The matrices called last (one stage), when the forward may stop before them: plain linear layers
    each called once, no experts or routers among the observed (their hooks need whole forwards)."""
    if not matrices or any(m.expert is not None or m.kind == "router" for m in matrices.values()):
        return []
    final = max(m.stage for m in matrices.values())
    last = [m for m in matrices.values() if m.stage == final]
    return last if len({id(m.module) for m in last}) == len(last) else []


def _expert_hook(module: nn.Module, experts: dict[int, list[Matrix]], callback: Observe, weight_by_router: bool):
    parameters = list(inspect.signature(module.forward).parameters)

    def hook(mod, args, kwargs):
        bound = dict(zip(parameters, args), **kwargs)
        feed_experts(module, experts, callback, weight_by_router, *(bound[p] for p in parameters[:3]))
    return hook


@torch.no_grad()
def feed_experts(module: nn.Module, experts: dict[int, list[Matrix]], callback: Observe, weight_by_router: bool,
                 hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, first: int = 0) -> None:
    """Hand each expert's matrices the inputs (and outputs) of the tokens routed to it, from one call of the
    experts module: `hidden` states, routing `index` and `weights`. `module` holds the experts from `first` on
    (a group of them, expert_groups.py; all by default)."""
    first_param, down = expert_params(module)

    def project(x: torch.Tensor, param: str, e: int) -> torch.Tensor:
        weight = getattr(module, param)[e - first]
        y = x @ weight if module.is_transposed else nn.functional.linear(x, weight)
        return y + getattr(module, f"{param}_bias")[e - first] if module.has_bias else y

    hidden = hidden.reshape(-1, hidden.shape[-1])
    for e, members in experts.items():
        token, slot = torch.where(index == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        scale = weights[token, slot].to(x.dtype)[:, None] if weight_by_router else None
        wanted = {m.name.rsplit(".", 1)[-1]: m.name for m in members}
        gate_up = project(x, first_param, e)
        if first_param in wanted:
            callback(wanted[first_param], x if scale is None else x * scale, gate_up if scale is None
                     else project(x * scale, first_param, e))
        if down in wanted:
            h = module._apply_gate(gate_up) if module.has_gate else module.act_fn(gate_up)
            callback(wanted[down], h if scale is None else h * scale,
                     project(h if scale is None else h * scale, down, e))
