"""The quantized checkpoint, in compressed-tensors' pack-quantized format, made by that library: each
quantized Linear's `weight` becomes `weight_packed` (int32), `weight_scale`, `weight_shape` (and
`weight_zero_point` when asymmetric); config.json gains the `quantization_config` transformers and vLLM
read. What is not quantized (the head, embeddings, routers) is named in its `ignore` list."""
from __future__ import annotations

import torch
from torch import nn

from ..config import OffloadPruneError
from ..model.matrices import Matrix
from .grid import Grid, compressed_tensors

FORMAT = "pack-quantized"


def quantized_matrices(matrices: dict[str, Matrix]) -> dict[str, Matrix]:
    """The block matrices that are quantized: every one, all Linear layers. Refused in one line: experts,
    which transformers fuses into one tensor that its loader of this format does not read per expert (so
    Mixture-of-Experts blocks, routers included, are not quantized), and matrices that are not Linear
    layers (GPT-2's Conv1D)."""
    experts = [name for name, m in matrices.items() if m.expert is not None]
    if experts:
        raise OffloadPruneError(f"--quantize: {experts[0]} is an expert that transformers keeps fused with the others "
                                "in one tensor, which compressed-tensors' pack-quantized format, as transformers "
                                "loads it, does not express per expert")
    chosen = {}
    for name, m in matrices.items():
        if type(m.module) is not nn.Linear:
            raise OffloadPruneError(f"--quantize: {name} is a {type(m.module).__name__}, not a Linear layer, and "
                                    "compressed-tensors quantizes Linear layers only")
        chosen[name] = m
    return chosen


def scheme(grid: Grid):
    quantization = compressed_tensors().quantization
    return quantization.QuantizationScheme(targets=["Linear"], weights=grid.args())


def compressed(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized Linear (local names: weight_packed, ...), packed by the
    library's own compressor from the fake-quantized `weight` and its scales (a meta weight gives their
    shapes and dtypes without data)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    parts = PackedQuantizationCompressor.compress(
        {"weight": weight, "weight_scale": scale, "weight_zero_point": zero}, scheme(grid))
    return {name: tensor.contiguous() for name, tensor in parts.items()}


def stored_layout(shape: tuple[int, int], scale_dtype: torch.dtype, grid: Grid) -> dict[str, tuple[tuple, torch.dtype]]:
    """{local name: (shape, dtype)} of what `compressed` writes for a weight of `shape` (the zero point as
    before packing: at least its size)."""
    rows, columns = shape
    meta = torch.empty(shape, device="meta")
    scale = torch.empty(rows, grid.groups(columns), dtype=scale_dtype, device="meta")
    parts = compressed(meta, scale, torch.empty(scale.shape, dtype=torch.int8, device="meta"), grid)
    return {name: (tuple(t.shape) if name != "weight_shape" else (2,), t.dtype) for name, t in parts.items()}


def quantization_config(grid: Grid, ignored: list[str]) -> dict:
    """config.json's `quantization_config`: one group of Linear layers on `grid`, the rest ignored."""
    quantization = compressed_tensors().quantization
    config = quantization.QuantizationConfig(config_groups={"group_0": scheme(grid)}, format=FORMAT,
                                             quantization_status=quantization.QuantizationStatus.COMPRESSED,
                                             ignore=sorted(ignored))
    return config.model_dump(mode="json")
