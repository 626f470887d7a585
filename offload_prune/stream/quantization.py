"""Quantization in the prune phase (--quantize): after a block's mask (and reconstruction), its Linear
weights are put on the integer grid, by GPTQ on the Hessians of their inputs through the pruned block
(one more statistics pass) or by rounding to nearest; the block then propagates with the quantized
weights, so the next block's statistics see them, and is written packed (quantize/checkpoint.py)."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..methods.sparsegpt import SparseGPT, output_energy
from ..model.matrices import Matrix
from ..quantize.checkpoint import compressed, quantized_matrices
from ..quantize.gptq import gptq, rtn
from ..quantize.grid import ColumnRounder, Grid
from ..runtime.hessian_sums import no_tf32
from .passes import Run, collect


class BlockQuantizer:
    """One run's quantizer: the grid, and what each block's quantized matrices are written as."""

    def __init__(self, run: Run):
        self.run = run
        self.grid = Grid.of(run.config)
        self.prefix = ""

    def begin(self, index: int) -> None:
        """Block `index` is about to be pruned (its scales' dtypes are its stored tensors')."""
        self.prefix = self.run.streamed.block_prefix(index)

    def rounder_for(self, name: str, matrix: Matrix) -> ColumnRounder:
        """--quant-joint: the rounder SparseGPT's sweep puts `name`'s kept weights on the grid with. One
        scale per row is fixed up front from all its weights (the mask is not chosen yet)."""
        weight = matrix.weight.float()
        rows, columns = weight.shape
        self.grid.check_columns(name, columns)
        stored = self.run.streamed.stored_dtype(self.prefix, matrix)
        static = (self.grid.scales(weight, torch.ones_like(weight, dtype=torch.bool), stored)
                  if self.grid.group_size == -1 else None)
        return ColumnRounder(self.grid, rows, columns, stored, weight.device, static=static)

    @torch.no_grad()
    def quantize(self, index: int, block: nn.Module, matrices: dict[str, Matrix], layer_kwargs: dict,
                 inputs: torch.Tensor) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
        """Quantize the block's Linear weights in place; returns ({matrix: its stored parts}, {matrix:
        what to report})."""
        run, grid = self.run, self.grid
        chosen = quantized_matrices(matrices)
        for name, m in chosen.items():
            grid.check_columns(name, m.in_features)
        prefix = run.streamed.block_prefix(index)
        rounded = getattr(run.method, "rounded", {})  # quantized already, in SparseGPT's sweep (--quant-joint)
        rest = {n: m for n, m in chosen.items() if n not in rounded}
        hessians = (self._hessians(block, rest, layer_kwargs, inputs)
                    if run.config.quant_method == "gptq" and rest else None)
        parts, info = {}, {}
        for name, m in chosen.items():
            start = time.perf_counter()
            stored = run.streamed.stored_dtype(prefix, m)
            weight = m.weight.float()
            hessian = hessians.get(name) if hessians is not None else None
            if name in rounded:
                rounder = rounded.pop(name)
                scale, zero = rounder.scale, rounder.zero
                quantized = self.grid.fake_quantize(weight, scale, zero)
                report = {"rule": "sparsegpt joint"}
            elif hessian is None:  # rtn, or a matrix the calibration windows never fed
                quantized, scale, zero = rtn(weight, grid, stored)
                report = {"rule": "rtn"}
            else:
                dead = hessian.diagonal() == 0
                with no_tf32():
                    quantized, scale, zero, retries = gptq(weight, hessian.clone(), grid, stored,
                                                           run.config.percdamp, run.config.blocksize,
                                                           run.config.quant_act_order)
                energy = output_energy(weight, hessian, dead)
                error = output_energy(weight - quantized, hessian, dead)
                report = {"rule": "gptq", "quantization_error": error / energy if energy > 0 else 0.0,
                          "damping_retries": retries}
            parts[name] = {k: v.cpu() for k, v in compressed(quantized, scale, zero, grid).items()}
            m.weight.copy_(quantized.to(stored).to(m.weight.dtype))  # what is stored is what propagates
            info[name] = {**report, "seconds": time.perf_counter() - start}
        return parts, info

    def _hessians(self, block: nn.Module, chosen: dict[str, Matrix], layer_kwargs: dict,
                  inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """H = (2/n) sum x x^T of each matrix's input through the pruned block (shared inputs share one),
        summed over the ranks: SparseGPT's statistics, taken without its prune."""
        run = self.run
        statistics = SparseGPT(run.config)
        collect(statistics, block, chosen, layer_kwargs, inputs, run.config, run.device)
        if run.ranks.world > 1:
            statistics.reduce_statistics(run.ranks, chosen)
        by_key: dict[str, list[str]] = {}
        for name in chosen:
            if name in statistics.input_key:
                by_key.setdefault(statistics.input_key[name], []).append(name)
        hessians = {}
        for key, names in by_key.items():
            dead = statistics.hessians[key].diagonal() == 0
            hessian = statistics.take_hessian(key, dead)
            hessian[dead, dead] = 0  # gptq and the error report tell dead inputs by their zero diagonal
            hessians.update({name: hessian for name in names})
        return hessians
