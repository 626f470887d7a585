"""FP8 checkpoints with block scales (DeepSeek-V3, Kimi-K2: `quantization_config.quant_method: fp8`,
`weight_block_size: [128, 128]`): each float8_e4m3 `weight` with its `weight_scale_inv` (one float32 per block
of rows x columns) read as the dense weight transformers dequantizes it to, w = q x scale over each block,
in the checkpoint's 16-bit dtype; and dense weights quantized back the same way, with fresh block scales.
"""
from __future__ import annotations

import math

import torch

from ..basics import OffloadPruneError
from .compressed import ConvertedWeights, quantization_section

SCALE = "weight_scale_inv"
FP8 = torch.float8_e4m3fn
#: The largest finite float8_e4m3fn value: a block's largest magnitude is scaled to it.
FP8_MAX = torch.finfo(FP8).max


def fp8_config(model_config) -> dict | None:
    """The checkpoint's FP8 `quantization_config`, or None."""
    return quantization_section(model_config, "fp8")


class BlockFP8Weights(ConvertedWeights):
    """The FP8 weights of a checkpoint, each read as one dense weight."""

    def __init__(self, config: dict, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 dense_dtype: torch.dtype):
        block = config.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise OffloadPruneError(f"FP8 checkpoint with weight_block_size {block!r}: only block scales "
                                    "([rows, columns], as DeepSeek-V3's [128, 128]) are read")
        if config.get("fmt", "e4m3") != "e4m3":
            raise OffloadPruneError(f"FP8 checkpoint in format {config.get('fmt')!r}: only e4m3 is read")
        self.block, self.dense_dtype = tuple(block), dense_dtype
        #: dense name -> {part: stored name}
        self.parts: dict[str, dict[str, str]] = {}
        for name, dtype in dtypes.items():
            if dtype != FP8:
                continue
            scale = name[:-len("weight")] + SCALE if name.endswith(".weight") else None
            if scale is None or scale not in shapes:
                raise OffloadPruneError(f"{name} is stored as float8_e4m3 without its {SCALE}: only block-scaled "
                                        "FP8 checkpoints are read")
            expected = self.grid(shapes[name])
            if len(shapes[name]) != 2 or tuple(shapes[scale]) != expected:
                raise OffloadPruneError(f"{scale} has shape {tuple(shapes[scale])} for a {tuple(shapes[name])} weight: "
                                        f"not the {self.block[0]}x{self.block[1]} block scales config.json names")
            self.parts[name] = {"weight": name, SCALE: scale}
        self.shapes = {name: tuple(shapes[name]) for name in self.parts}
        self.dtypes = dict.fromkeys(self.parts, dense_dtype)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(math.ceil(size / b) for size, b in zip(shape, self.block))

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """[grid rows, block rows, grid columns, block columns] float32 view of a weight, zero-padded where its
        size is not a multiple of the block (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: 4.5 blocks of 128)."""
        rows, cols = weight.shape
        (grid_rows, grid_cols), (block_rows, block_cols) = self.grid(weight.shape), self.block
        padded = torch.nn.functional.pad(weight.to(torch.float32), (0, grid_cols * block_cols - cols,
                                                                    0, grid_rows * block_rows - rows))
        return padded.reshape(grid_rows, block_rows, grid_cols, block_cols)

    def convert(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, cols = parts["weight"].shape
        dense = self._blocks(parts["weight"]) * parts[SCALE].to(torch.float32)[:, None, :, None]
        return dense.flatten(0, 1).flatten(1, 2)[:rows, :cols].to(self.dense_dtype)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3 weight, float32 weight_scale_inv): each block's largest magnitude mapped to the largest
        FP8 value; a block of zeros gets scale 1 (its weights stay exactly zero, as pruning left them)."""
        rows, cols = weight.shape
        blocks = self._blocks(weight)
        largest = blocks.abs().amax(dim=(1, 3))
        scales = torch.where(largest > 0, largest / FP8_MAX, torch.ones_like(largest))
        quantized = (blocks / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return quantized.flatten(0, 1).flatten(1, 2)[:rows, :cols].contiguous(), scales
