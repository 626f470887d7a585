"""Which linear layers of a block are pruned: the seeds' module-selection flags, for every method."""
from __future__ import annotations

from torch import nn

from .config import PruneConfig


def module_kind(name: str) -> str:
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered or "ffn" in lowered:
        return "mlp"
    if "lm_head" in lowered:
        return "lm_head"
    return "other"


def mlp_only(config: PruneConfig) -> bool:
    """--pruning_last forces MLP-only whatever the attention flag says (seed 000); structured
    pruning removes whole MLP neurons."""
    return config.pruning_last is not None or not config.nr_include_attention or config.sparsity_type == "structured"


def selected_linears(linears: dict[str, nn.Linear], layer_index: int, num_layers: int,
                     config: PruneConfig) -> dict[str, nn.Linear]:
    if config.pruning_last is not None and layer_index < num_layers - config.pruning_last:
        return {}
    return {n: m for n, m in linears.items() if not mlp_only(config) or module_kind(n) == "mlp"}
