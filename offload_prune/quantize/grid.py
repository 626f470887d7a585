"""The integer grid a quantized weight lies on, in compressed-tensors' terms.

A group of `group_size` input columns of one output row shares a scale s (and, asymmetric, an integer
zero point z); a weight w is stored as q = clamp(round(w / s) + z, qmin, qmax) with [qmin, qmax] =
[-2^(b-1), 2^(b-1) - 1], and read back as (q - z) s. Symmetric: z = 0 and s = max|w| / ((qmax - qmin) / 2);
asymmetric: s = (max - min) / (qmax - qmin) over the group with 0 included in [min, max], so that zero is
on the grid either way: a pruned weight stays exactly zero. The scale is rounded to the dtype it is
stored in before anything is quantized with it, so the stream computes with exactly the weights a
loader reads back. Quantizing and dequantizing are compressed-tensors' own functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OffloadPruneError, PruneConfig
from ..disk.compressed import INSTALL_HINT


def compressed_tensors():
    """The compressed-tensors package, or a one-line refusal saying how to install it."""
    try:
        import compressed_tensors
    except ImportError:
        raise OffloadPruneError(f"--quantize writes compressed-tensors checkpoints and needs that package: "
                                f"{INSTALL_HINT}") from None
    return compressed_tensors


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # -1: one group per row (per output channel)
    symmetric: bool

    @classmethod
    def of(cls, config: PruneConfig) -> "Grid":
        return cls(config.quant_bits, config.quant_group_size, not config.quant_asym)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else columns // self.group_size

    def width(self, columns: int) -> int:
        return columns if self.group_size == -1 else self.group_size

    def check_columns(self, name: str, columns: int) -> None:
        if self.group_size != -1 and columns % self.group_size:
            divisors = [g for g in (128, 64, 32, 16) if columns % g == 0]
            hint = f"--quant-group-size {divisors[0]}" if divisors else "--quant-group-size -1"
            raise OffloadPruneError(f"--quant-group-size {self.group_size} does not divide the {columns} input "
                                    f"columns of {name}: use {hint}")

    def args(self):
        """compressed-tensors' QuantizationArgs for these weights."""
        quantization = compressed_tensors().quantization
        return quantization.QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.symmetric,
            strategy="channel" if self.group_size == -1 else "group",
            group_size=None if self.group_size == -1 else self.group_size)

    def scales(self, weight: torch.Tensor, kept: torch.Tensor, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [rows, groups] in `scale_dtype`, zero point [rows, groups] int8) of a float32 `weight`
        [rows, columns] whose `kept` entries (bool, same shape) are the ones that will hold values."""
        grouped = weight.masked_fill(~kept, 0).unflatten(-1, (-1, self.width(weight.shape[-1])))
        low = grouped.amin(-1).clamp(max=0)
        high = grouped.amax(-1).clamp(min=0)
        if self.symmetric:
            scale = torch.maximum(-low, high) / ((self.qmax - self.qmin) / 2)
        else:
            scale = (high - low) / (self.qmax - self.qmin)
        # An all-zero group: any scale represents it; 1 avoids dividing by zero.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
        wide = scale.float()
        zero = torch.zeros_like(scale, dtype=torch.int8) if self.symmetric else \
            (self.qmin - torch.round(low / wide)).clamp(self.qmin, self.qmax).to(torch.int8)
        return scale, zero

    def fake_quantize(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """round-to-grid then back, by compressed-tensors' own function: (q - z) s computed in the scale's
        dtype, as a loader dequantizes; returned in float32."""
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        return fake_quantize(weight.float(), scale, zero, self.args()).float()

    def column(self, column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """One float32 column quantized and dequantized with its rows' float32 scales: GPTQ's inner step,
        the same arithmetic as `fake_quantize` (x / s + z, round half to even, clamp, (q - z) s)."""
        q = torch.clamp(torch.round(column / scale + zero), self.qmin, self.qmax)
        return (q - zero) * scale


class ColumnRounder:
    """A sweep's inner step (GPTQ's, or SparseGPT's with --quant-joint): one column's kept weights to
    their group's grid, rounded to the scale's dtype as a loader dequantizes them, pruned ones to zero.
    A group's scales are fixed when its first column is reached, from the group's current kept weights
    in the sweep's column block (which must hold the whole group); `static` scales are fixed up front."""

    def __init__(self, grid: Grid, rows: int, columns: int, scale_dtype: torch.dtype, device: torch.device,
                 static: tuple[torch.Tensor, torch.Tensor] | None = None, order: torch.Tensor | None = None):
        self.grid, self.scale_dtype, self.order = grid, scale_dtype, order
        self.width = grid.width(columns)
        self.static = static is not None
        self.scale, self.zero = static if static is not None else (
            torch.empty(rows, grid.groups(columns), dtype=scale_dtype, device=device),
            torch.empty(rows, grid.groups(columns), dtype=torch.int8, device=device))

    def __call__(self, block: torch.Tensor, kept: torch.Tensor, j: int, column: int) -> torch.Tensor:
        """Column j of the sweep's current `block` (absolute column `column`) quantized; `kept` is the
        block's mask of weights that keep a value."""
        if not self.static and column % self.width == 0:
            group = column // self.width
            self.scale[:, group:group + 1], self.zero[:, group:group + 1] = self.grid.scales(
                block[:, j:j + self.width], kept[:, j:j + self.width], self.scale_dtype)
        group = (int(self.order[column]) if self.order is not None else column) // self.width
        rounded = self.grid.column(block[:, j], self.scale[:, group].float(), self.zero[:, group].float())
        return rounded.to(self.scale_dtype).float().masked_fill_(~kept[:, j], 0)
