"""Which weight matrices of a block are pruned: the seeds' module-selection flags, for every method,
by the role the block's own forward gives each matrix (attention, mlp, router)."""
from __future__ import annotations

from ..config import PruneConfig
from .matrices import Matrix


def mlp_only(config: PruneConfig) -> bool:
    """--pruning_last forces MLP-only whatever the attention flag says (seed 000); structured
    pruning removes whole MLP neurons, and attention heads only when --prune-heads asks."""
    if config.sparsity_type == "structured":
        return not config.prune_heads
    return config.pruning_last is not None or not config.nr_include_attention


def selected_matrices(matrices: dict[str, Matrix], layer_index: int, num_layers: int,
                      config: PruneConfig) -> dict[str, Matrix]:
    if config.pruning_last is not None and layer_index < num_layers - config.pruning_last:
        return {}
    wanted = {"mlp"} if mlp_only(config) else {"mlp", "attention"}
    if config.prune_router and config.sparsity_type != "structured":
        wanted.add("router")
    return {n: m for n, m in matrices.items() if m.kind in wanted}
