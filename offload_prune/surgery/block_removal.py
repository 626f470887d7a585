"""Removing whole decoder blocks: ShortGPT's Block Influence (Men et al. 2024) and the surgery that
turns N removed blocks into a smaller checkpoint transformers loads as usual.

Block Influence of block i is 1 - E_t[cos(x_i,t, x_i+1,t)] over every calibration token t: a block
whose output points where its input pointed adds little. It is measured in the streamed dense pass,
one block at a time, from the block's own forward (a hook sees its input and output).

The output keeps the remaining blocks unchanged, renumbered 0..L-N-1; config.json gets the new
`num_hidden_layers` and every per-layer list (`layer_types`, per-layer head counts, ...) keeps the
entries of the blocks that remain. Whether the new config describes the remaining blocks is asked of
transformers: each remaining block, built from the new config, must have the parameters and
settings (attention type, sliding window, ...) the block had in the original model.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import OffloadPruneError

#: Attributes that differ between blocks by position alone, not by what the block computes.
POSITIONAL_ATTRIBUTES = ("layer_idx", "layer_id", "layer_number", "block_idx")


class InfluenceMeter:
    """Sum over tokens of cos(block input, block output), from a forward hook on the block; also each
    window's last-token input and output (for the angular distance)."""

    def __init__(self):
        self.cos_sum = 0.0
        self.tokens = 0
        self.last_in: list[torch.Tensor] = []
        self.last_out: list[torch.Tensor] = []

    def attach(self, block: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return block.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        cos = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        self.cos_sum += float(cos.double().sum())
        self.tokens += cos.numel()
        # Copies: the input may be a view of the activation cache, which the block's output overwrites.
        self.last_in.append(hidden_in[:, -1].float().cpu().clone())
        self.last_out.append(hidden_out[:, -1].float().cpu().clone())

    def result(self) -> dict:
        return {"influence": 1.0 - self.cos_sum / self.tokens, "tokens": self.tokens}


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gromov et al. 2024: mean over windows of arccos(cos(a_w, b_w)) / pi, of last-token states."""
    cos = nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / torch.pi)


class AngularWindow:
    """Last-token states of the latest `span` block boundaries (boundary i feeds block i), kept in a run
    file between blocks, so the distance between boundaries l and l + span is known when block
    l + span - 1 finishes (and after a resume)."""

    def __init__(self, span: int, states: dict[int, torch.Tensor] | None = None):
        self.span, self.states = span, dict(states or {})

    def advance(self, index: int, block_in: torch.Tensor, block_out: torch.Tensor) -> float | None:
        """Block `index` has run: its input is boundary `index`, its output boundary `index + 1`.
        Returns the distance of removing blocks index + 1 - span .. index, once there is such a run."""
        self.states.setdefault(index, block_in)
        self.states[index + 1] = block_out
        start = index + 1 - self.span
        distance = angular_distance(self.states[start], block_out) if start >= 0 else None
        self.states = {b: t for b, t in self.states.items() if b > start}
        return distance


def contiguous_run(distances: list[float | None], span: int) -> list[int]:
    """The `span` consecutive blocks whose removal joins the closest boundaries (Gromov et al.)."""
    starts = [(d, l) for l, d in enumerate(distances) if d is not None]
    start = min(starts)[1]
    return list(range(start, start + span))


def check_removal_count(count: int, num_layers: int) -> None:
    if not 0 < count < num_layers:
        raise OffloadPruneError(f"--remove-layers {count}: the model has {num_layers} blocks; at least one must remain")


def removal_order(influence: list[float]) -> list[int]:
    """Blocks from the first to remove to the last: lowest influence first (ties: the later block)."""
    return sorted(range(len(influence)), key=lambda i: (influence[i], -i))


def lowest_influence(influence: list[float], count: int) -> list[int]:
    """The `count` blocks with the lowest influence, in block order."""
    check_removal_count(count, len(influence))
    return sorted(removal_order(influence)[:count])


def removal_for_budget(influence: list[float], block_params: list[int], total_params: int,
                       target: int) -> list[int]:
    """The fewest lowest-influence blocks whose removal brings the checkpoint to `target` parameters."""
    removed, remaining = [], total_params
    for index in removal_order(influence)[:-1]:
        if remaining <= target:
            break
        removed.append(index)
        remaining -= block_params[index]
    if remaining > target:
        raise OffloadPruneError(f"--target-params {target:,}: even with one block left the checkpoint holds "
                                f"{remaining:,} parameters (embeddings and head included)")
    return sorted(removed)


def renumbered(name: str, old: int, new: int) -> str:
    """A block tensor's checkpoint name with its block index changed (the first numeric segment)."""
    match = re.search(r"(?:^|\.)(\d+)\.", name)
    if match is None or int(match.group(1)) != old:
        raise OffloadPruneError(f"{name}: cannot tell which block this tensor belongs to from its name")
    return name[:match.start(1)] + str(new) + name[match.end(1):]


def config_without_blocks(config_json: dict, model_config, kept: list[int]) -> dict:
    """config.json for the kept blocks: `num_hidden_layers` and every per-layer list, including lists
    transformers derives when loading (Gemma's `layer_types` from its sliding-window pattern), which
    are written out so the pattern no longer needs to hold."""
    layers = model_config.num_hidden_layers
    out = dict(config_json, num_hidden_layers=len(kept))
    for key, value in model_config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == layers and layers > 1:
            out[key] = [value[i] for i in kept]
    return out


def check_blocks_expressed(old_layers: nn.ModuleList, new_layers: nn.ModuleList, kept: list[int],
                           changed: list[str]) -> None:
    """Each kept block must be built, from the new config, as it was built from the old one."""
    for new_index, old_index in enumerate(kept):
        before, after = block_signature(old_layers[old_index]), block_signature(new_layers[new_index])
        if before != after:
            what = sorted(set(before.items()) ^ set(after.items()))[0][0]
            raise OffloadPruneError(
                f"config.json cannot describe the blocks that remain: block {old_index} would load as block "
                f"{new_index} with a different {what} (the config's per-layer settings, {', '.join(changed) or 'none'},"
                " do not say it); remove other blocks or fewer")


def block_signature(block: nn.Module) -> dict[str, object]:
    """What a block is built as: its parameters' shapes and its modules' plain settings."""
    signature: dict[str, object] = {f"shape of {n}": tuple(p.shape) for n, p in block.named_parameters()}
    for path, module in block.named_modules():
        for key, value in vars(module).items():
            if (not key.startswith("_") and key not in POSITIONAL_ATTRIBUTES
                    and isinstance(value, (int, float, str, bool, type(None)))):
                signature[f"{path or 'block'}.{key}"] = value
    return signature
