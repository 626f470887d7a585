"""--sparsity_type structured: whole MLP neurons, ranked by a method's neuron score (its
`neuron_scores`), removed from the matrices (--shrink) or zeroed, and the output matrix refitted on
the kept neurons by least squares (--neuron-refit; neurons.py has the math)."""
from __future__ import annotations

import torch

from ..matrices import Matrix
from ..neurons import (InputMoments, compensation, highest, kept_width, mlp_units, refit_bytes, refit_output,
                       shrink_neurons, zero_neurons)
from .base import PruningMethod


class StructuredNeurons(PruningMethod):
    def __init__(self, config, scorer: PruningMethod):
        super().__init__(config)
        self.scorer = scorer
        self.refit = config.neuron_refit
        self.needs_calibration = scorer.needs_calibration or self.refit
        self.calibration_passes = scorer.calibration_passes
        self.weights_by_router = scorer.weights_by_router
        self.options = (*scorer.options, "shrink", "neuron_refit")
        self.outputs: dict[str, Matrix] = {}
        self.moments: dict[str, InputMoments] = {}
        self.calibration_pass = 0

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        self.outputs = {u.output.name: u.output for u in mlp_units(linears)}
        return self.scorer.groups(linears)

    def start_pass(self, index: int) -> None:
        self.calibration_pass = index
        self.scorer.start_pass(index)

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        self.scorer.add_batch(name, inputs, outputs)
        if name in self.outputs and self.calibration_pass == 0:
            moments = self.moments.setdefault(name, InputMoments.empty(inputs.shape[-1], inputs.device))
            moments.add(inputs, with_gram=self.refit)

    def discard(self, names: list[str]) -> None:
        self.scorer.discard(names)
        for name in names:
            self.moments.pop(name, None)

    def rule(self, name: str) -> str:
        return f"{self.scorer.rule(name)}(structured{', shrink' if self.config.shrink else ''})"

    @torch.no_grad()
    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        results: dict[str, dict] = {}
        for unit in mlp_units(linears):
            width, output = unit.neurons, unit.output
            moments = self.moments.pop(output.name, None)
            kept = highest(self.scorer.neuron_scores(unit, moments).cpu(), kept_width(width, sparsity))
            info = {"neurons": width, "neurons_kept": int(kept.numel())}
            refit, shift = None, None
            if self.refit and moments is not None and moments.tokens:
                refit, shift = refit_output(output.weight, moments, kept.to(output.weight.device),
                                            output.bias is not None, self.config.percdamp)
                info["refit"] = True
            elif self.scorer.compensates_bias and moments is not None:
                if output.bias is not None:
                    removed = torch.ones(width, dtype=torch.bool)
                    removed[kept] = False
                    shift = compensation(output.weight, moments, torch.nonzero(removed).flatten())
                else:
                    info["bias_compensation"] = "none: the output matrix has no bias"
            if self.config.shrink:
                shrink_neurons(unit, kept)
                columns = slice(None)
            else:
                zero_neurons(unit, kept)
                columns = kept.to(output.weight.device)
            if refit is not None:
                output.weight[:, columns] = refit
            if shift is not None:
                output.bias.add_(shift)
            for m in unit.matrices:
                results[m.name] = {"rule": self.rule(m.name), **info}
        return results

    def statistics_bytes(self, linears: dict[str, Matrix]) -> int:
        return self.scorer.statistics_bytes(linears) + self._moments_bytes(linears)

    def _moments_bytes(self, linears: dict[str, Matrix]) -> int:
        """float64 sums and squares per neuron, and H when refitting."""
        return sum(u.neurons * 16 + (u.neurons ** 2 * 8 if self.refit else 0) for u in mlp_units(linears))

    def memory_bytes(self, linears: dict[str, Matrix], compute_dtype: torch.dtype) -> dict[str, int]:
        """The scorer's own terms with the moments on top; then, one after the other, the neuron scores
        (float64 copies of a unit's largest matrix) and the refit (`refit_bytes`)."""
        scorer = self.scorer.memory_bytes(linears, compute_dtype)
        moments = self._moments_bytes(linears)
        units = mlp_units(linears)
        if not units:
            return scorer
        ratio = self.config.sparsity_ratio
        scores = max(2 * 8 * m.weight.numel() for u in units for m in u.matrices)
        refit = max(refit_bytes(u.neurons, kept_width(u.neurons, ratio), u.output.out_features,
                                u.output.bias is not None) for u in units) if self.refit else 0
        return {"statistics": scorer["statistics"] + moments,
                "prune": max(scorer["prune"], scorer["statistics"]) + moments + max(scores, refit)}
