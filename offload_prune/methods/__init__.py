"""Pruning methods, by the name --prune_method gives them."""
from __future__ import annotations

from ..config import PruneConfig
from .admm import ADMM
from .base import PruningMethod
from .hybrid import Hybrid
from .magnitude import Magnitude
from .neuronrank import NeuronRank
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHOD_CLASSES: dict[str, type[PruningMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
                                                   "admm": ADMM, "ria": RIA,
                                                   "neuronrank_old": NeuronRank, "neuronrank_tfidf": NeuronRank,
                                                   "hybrid": Hybrid}


def build_method(config: PruneConfig) -> PruningMethod:
    return METHOD_CLASSES[config.prune_method](config)
