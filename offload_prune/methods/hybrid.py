"""Hybrid: Wanda for the attention projections, a NeuronRank method for the MLP (seed 001)."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..model.matrices import Matrix
from .base import PruningMethod
from .neuronrank import NeuronRank
from .wanda import Wanda


class Hybrid(PruningMethod):
    options = NeuronRank.options + ("hybrid_mlp_method",)

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        self.attention = Wanda(config)
        self.mlp = NeuronRank(config, variant=config.hybrid_mlp_method)
        self.calibration_passes = self.mlp.calibration_passes
        self.calibration_pass = 0
        self.weights_by_router = self.mlp.weights_by_router  # experts are MLP matrices
        self.reads_outputs = self.attention.reads_outputs or self.mlp.reads_outputs
        self.matrices: dict[str, Matrix] = {}

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        self.matrices = linears
        self.mlp.groups({n: m for n, m in linears.items() if m.kind != "attention"})
        return [list(linears)]

    def discard(self, names: list[str]) -> None:
        self.attention.discard(names)
        self.mlp.discard(names)

    def _part(self, name: str) -> PruningMethod:
        return self.attention if self.matrices[name].kind == "attention" else self.mlp

    def rule(self, name: str) -> str:
        return self._part(name).rule(name)

    def start_pass(self, index: int) -> None:
        self.calibration_pass = index
        self.mlp.start_pass(index)

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        part = self._part(name)
        if part is self.mlp or self.calibration_pass == 0:  # Wanda needs one pass
            part.add_batch(name, inputs, outputs)

    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        results = {}
        for part in (self.attention, self.mlp):
            mine = {n: m for n, m in linears.items() if self._part(n) is part}
            if mine:
                results.update({n: {"rule": part.rule(n), **info} for n, info in part.prune(mine, sparsity).items()})
        return results

    def memory_bytes(self, linears, compute_dtype, device_type) -> dict[str, int]:
        self.groups(linears)
        parts = [part.memory_bytes({n: m for n, m in linears.items() if self._part(n) is part}, compute_dtype,
                                   device_type)
                 for part in (self.attention, self.mlp) if any(self._part(n) is part for n in linears)]
        return {"statistics": sum(p["statistics"] for p in parts), "prune": sum(p["prune"] for p in parts)}
