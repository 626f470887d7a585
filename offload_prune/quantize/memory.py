"""What --quantize adds to the prune phase's plan: the Hessians of the block's inputs, collected through
the pruned block (as SparseGPT collects them, whichever method pruned), then one matrix's GPTQ: the
Hessian's copy and its factor, and float32 temporaries of the weight (its copy in the sweep, the
quantized result, the grid's and the error report's temporaries)."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..methods.sparsegpt import SparseGPT
from ..model.matrices import Matrix

#: float32 weight-sized temporaries alive at once while one matrix is quantized and its error measured.
GPTQ_WEIGHT_COPIES = 6


def quantization_bytes(config: PruneConfig, matrices: dict[str, Matrix], compute: torch.dtype,
                       device_type: str) -> dict[str, int]:
    """The parts of the quantization step's peak (bytes)."""
    hessians = SparseGPT(config).memory_bytes(matrices, compute, device_type)["statistics"] \
        if config.quant_method == "gptq" else 0
    widest = max(m.in_features for m in matrices.values())
    squares = 2 * widest ** 2 * 4 if config.quant_method == "gptq" else 0
    largest = max(m.weight.numel() for m in matrices.values())
    return {"quant_hessians": hessians, "quant_factor": squares, "quant_workspace": GPTQ_WEIGHT_COPIES * 4 * largest}
