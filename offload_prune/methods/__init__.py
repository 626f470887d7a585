"""Pruning methods, by the name --prune_method gives them."""
from __future__ import annotations

from ..config import PruneConfig
from .admm import ADMM
from .base import PruningMethod
from .flap import FLAP
from .hybrid import Hybrid
from .magnitude import Magnitude
from .neuronrank import NeuronRank
from .ria import RIA
from .shortgpt import ShortGPT
from .sparsegpt import SparseGPT
from .structured import StructuredNeurons
from .wanda import Wanda

METHOD_CLASSES: dict[str, type[PruningMethod]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT,
                                                   "admm": ADMM, "ria": RIA,
                                                   "neuronrank_old": NeuronRank, "neuronrank_tfidf": NeuronRank,
                                                   "hybrid": Hybrid, "shortgpt": ShortGPT, "flap": FLAP}


def build_method(config: PruneConfig) -> PruningMethod:
    method = METHOD_CLASSES[config.prune_method](config)
    return StructuredNeurons(config, method) if config.sparsity_type == "structured" else method
