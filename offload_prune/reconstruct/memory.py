"""The compute-device bytes of reconstructing one block, for the memory plan (plan/memory.py adds the
block itself, and the target's cache where the activation cache is)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..model.matrices import Matrix
from .units import trained_parameters, training_units, unit_parameters

#: Optimiser state per trained float32 parameter: Adam's two moments, SGD's momentum.
OPTIMIZER_STATE_BYTES = {"adam": 8, "sgd": 4}


def reconstruction_bytes(config: PruneConfig, block: nn.Module, matrices: dict[str, Matrix],
                         compute: torch.dtype, backward_bytes: int, forward_bytes: int) -> list[dict[str, int]]:
    """What a block's reconstruction holds beside the block's own weights, in its two steps: training a unit,
    then the final error check (`block` may be on the meta device: only shapes are read). `backward_bytes`:
    the activations one micro-batch's backward pass keeps, in float32; `forward_bytes`: one micro-batch's
    forward in the block's dtype."""
    trained = trained_parameters(block, matrices, config.recon_norms)
    # Units in definition order stand in for the call order here: only their sizes matter.
    units = training_units(config.reconstruct, trained, lambda names: names)
    numel = {name: p.numel() for name, p in trained.items()}
    trained_numel = sum(numel.values())
    largest_unit = max(sum(numel[n] for n in unit_parameters(u, trained)) for u in units)
    block_numel = sum(p.numel() for p in block.parameters())
    half = compute.itemsize != 4  # the block computes in 16 bits: its frozen parts are cast to float32
    local_targets = config.reconstruct == "sublayer" and config.recon_target == "dense-block"
    # Masters of every unit trained so far (the block's, or each finished sub-layer's, kept until the end).
    masters = 4 * trained_numel
    training = {
        "recon_masters": masters,
        "recon_gradients": 4 * largest_unit,
        "recon_optimizer": OPTIMIZER_STATE_BYTES[config.recon_optimizer] * largest_unit,
        "recon_frozen_float32": 4 * (block_numel - trained_numel + (0 if local_targets else trained_numel
                                                                   - largest_unit)) if half else 0,
        # Sub-layers' own targets: the dense block's weights, taken before the mask.
        "recon_dense_copy": block_numel * compute.itemsize if local_targets else 0,
        "recon_backward": backward_bytes,
    }
    # The masters cast to the block's dtype for the final error check (the optimiser is gone by then).
    check = {"recon_masters": masters, "recon_final_cast": trained_numel * compute.itemsize if half else 0,
             "micro_batch": forward_bytes}
    return [training, check]
