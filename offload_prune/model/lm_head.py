"""The output projection pruned at the end of a run (--nr-prune-lm-head)."""
from __future__ import annotations

import torch

from ..config import OffloadPruneError, PruneConfig
from ..runtime.masks import zero_lowest
from .skeleton import StreamedModel


class LmHead:
    """The output projection, pruned by magnitude at the end (--nr-prune-lm-head). A tied head has no
    tensor of its own: it is read from the embedding and written as a new tensor."""

    def __init__(self, streamed: StreamedModel):
        model = streamed.model
        paths = {module: path for path, module in model.named_modules()}
        head = paths[model.get_output_embeddings()] + ".weight"
        embedding = paths[model.get_input_embeddings()] + ".weight"
        own = streamed.checkpoint_name(head)  # GPT-NeoX stores its head as embed_out
        if own is None and streamed.checkpoint_name(embedding) is None:
            raise OffloadPruneError(f"--nr-prune-lm-head: {head} is not stored as one tensor in this checkpoint")
        self.name = own or head
        self.source = own or streamed.checkpoint_name(embedding)

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, config: PruneConfig, device: torch.device) -> torch.Tensor:
        """In place on the stored (CPU) tensor; scores made on the compute device a chunk at a time."""
        zero_lowest(weight, lambda rows: weight[rows].to(device, torch.float32).abs(), config.sparsity_ratio,
                    config.nm, per_row=False, scores_on=device)
        return weight
