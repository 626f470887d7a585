"""offload-prune: prune large language models block by block, streamed from safetensors shards.

The Python API is the CLI's commands: `prune`, `plan`, `perplexity` and `evaluate_tasks` (api.py).
"""
__version__ = "0.1.0"

from .api import evaluate_tasks, perplexity, plan, prune  # noqa: E402  (after __version__, which the stream records)
from .config import OffloadPruneError, PruneConfig  # noqa: E402

__all__ = ["prune", "plan", "perplexity", "evaluate_tasks", "OffloadPruneError", "PruneConfig", "__version__"]
