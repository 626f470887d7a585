"""Pruning methods, by the name --prune_method gives them."""
from __future__ import annotations

from ..config import PruneConfig
from .base import PruningMethod
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHOD_CLASSES: dict[str, type[PruningMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def build_method(config: PruneConfig) -> PruningMethod:
    return METHOD_CLASSES[config.prune_method](config)
