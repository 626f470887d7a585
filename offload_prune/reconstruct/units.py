"""What trains in a block, and in which units.

Trained: the weights of the block's matrices (an expert's fused parameter as a whole), never a router's (it
stays frozen, so every expert learns from the tokens it was routed); with --recon-norms also the biases and
norm weights. Frozen: everything else (convolutions, rotary tables, routers).

Units: `block` trains all of it at once against the block's output. `sublayer` trains the block's
top-level modules that hold trained matrices (the attention, the MLP) one at a time, in the order the
block calls them, each against its own output: only the largest of them holds optimiser state at once.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..model.matrices import Matrix

#: The name a whole-block unit goes by.
WHOLE_BLOCK = ""


def trained_parameters(block: nn.Module, matrices: dict[str, Matrix], with_norms: bool) -> dict[str, nn.Parameter]:
    """The block's parameters reconstruction trains, by their names in the block."""
    owners = {id(m.module) for m in matrices.values() if m.kind != "router"}
    routers = {id(m.module) for m in matrices.values() if m.kind == "router"}
    trained = {}
    for path, module in block.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{path}.{leaf}" if path else leaf
            is_matrix = id(module) in owners and param.dim() >= 2
            is_small = with_norms and param.dim() == 1 and id(module) not in routers
            if is_matrix or is_small:
                trained[name] = param
    return trained


def training_units(mode: str, trained: dict[str, nn.Parameter], call_order: Callable[[list[str]], list[str]]
                   ) -> list[str]:
    """The units trained one after another: the whole block, or its top-level modules holding trained
    matrices, ordered by `call_order` (which runs the block once and returns the given names as called)."""
    if mode == "block":
        return [WHOLE_BLOCK]
    tops = list(dict.fromkeys(name.split(".")[0] for name, p in trained.items() if p.dim() >= 2 and "." in name))
    return call_order(tops) if len(tops) > 1 else tops or [WHOLE_BLOCK]


def unit_parameters(unit: str, trained: dict[str, nn.Parameter]) -> list[str]:
    if unit == WHOLE_BLOCK:
        return list(trained)
    return [name for name in trained if name.startswith(unit + ".")]


def modules_in_call_order(block: nn.Module, names: list[str], run_once: Callable[[], None]) -> list[str]:
    """The block's submodules `names`, in the order its forward first calls them (run once)."""
    called: list[str] = []
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: called.append(name) if name not in called else None) for name in names]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    return called + [name for name in names if name not in called]
