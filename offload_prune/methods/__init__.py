"""Pruning methods, by the name --prune_method gives them."""
from __future__ import annotations

from ..config import PruneConfig
from .base import PruningMethod
from .hybrid import Hybrid
from .magnitude import Magnitude
from .neuronrank import NeuronRank
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHOD_CLASSES: dict[str, type[PruningMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
                                                   "neuronrank_old": NeuronRank, "neuronrank_tfidf": NeuronRank,
                                                   "hybrid": Hybrid}


def build_method(config: PruneConfig) -> PruningMethod:
    return METHOD_CLASSES[config.prune_method](config)
