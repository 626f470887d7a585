"""Pruning methods, by the name --prune_method gives them: one small file per algorithm, each a
PruningMethod (base.py) with a few hooks; the stream knows nothing method-specific.

Imports: config, disk/, runtime/, model/ and surgery/."""
from __future__ import annotations

from ..config import PruneConfig
from ..surgery.heads import key_value_groups
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


def build_method(config: PruneConfig, model_config=None) -> PruningMethod:
    """The method; structured pruning of attention heads also needs the model's config.json (its
    key/value group count)."""
    method = METHOD_CLASSES[config.prune_method](config)
    if config.sparsity_type != "structured":
        return method
    return StructuredNeurons(config, method, key_value_groups(model_config) if config.prune_heads else None)
