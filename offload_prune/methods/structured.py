"""--sparsity_type structured: whole MLP neurons (and, with --prune-heads, whole key/value groups of
attention heads, heads.py), ranked by a method's neuron score (its
`neuron_scores`), removed from the matrices (--shrink) or zeroed, and the output matrix refitted on
the kept neurons by least squares (--neuron-refit; neurons.py has the math)."""
from __future__ import annotations

from typing import Callable

import torch

from ..model.matrices import Matrix
from ..surgery.heads import HeadGroups, head_units, kept_groups, shrink_groups, zero_groups
from ..surgery.neurons import (InputMoments, compensation, highest, kept_width, mlp_units, refit_bytes, refit_output,
                               shrink_neurons, zero_neurons)
from .base import PruningMethod


class StructuredNeurons(PruningMethod):
    def __init__(self, config, scorer: PruningMethod, key_value_groups: int | None = None):
        super().__init__(config)
        self.key_value_groups = key_value_groups  # of every attention layer, when --prune-heads
        self.scorer = scorer
        self.refit = config.neuron_refit
        self.needs_calibration = scorer.needs_calibration or self.refit
        self.calibration_passes = scorer.calibration_passes
        self.weights_by_router = scorer.weights_by_router
        self.reads_outputs = scorer.reads_outputs  # the moments read inputs only
        self.options = (*scorer.options, "shrink", "neuron_refit", "prune_heads")
        self.outputs: dict[str, Matrix] = {}
        self.moments: dict[str, InputMoments] = {}
        self.calibration_pass = 0

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        self.outputs = {m.name: m for m in self._outputs(linears)}
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
            moments = self.moments.pop(unit.output.name, None)
            kept = highest(self.scorer.neuron_scores(unit, moments).cpu(), kept_width(unit.neurons, sparsity))
            info = {"neurons": unit.neurons, "neurons_kept": int(kept.numel())}
            self._remove(unit.matrices, unit.output, moments, kept, info, results,
                         lambda unit=unit, kept=kept: (shrink_neurons if self.config.shrink else zero_neurons)(unit, kept))
        for heads in self._head_units(linears):
            moments = self.moments.pop(heads.output.name, None)
            scores = self.scorer.neuron_scores(heads.scoring_unit(), moments).cpu()
            kept = highest(heads.group_scores(scores), kept_groups(heads.groups, self.config.prune_heads))
            self.scorer.discard([m.name for m in heads.inputs])  # scored by the output projection alone
            info = {"key_value_groups": heads.groups, "key_value_groups_kept": int(kept.numel())}
            self._remove([*heads.inputs, heads.output], heads.output, moments, heads.columns(kept), info, results,
                         lambda heads=heads, kept=kept: (shrink_groups if self.config.shrink else zero_groups)(heads, kept))
        return results

    def _remove(self, matrices: list[Matrix], output: Matrix, moments: InputMoments | None, kept: torch.Tensor,
                info: dict, results: dict[str, dict], remove: Callable[[], None]) -> None:
        """Refit (or compensate) the output matrix on its `kept` columns, then `remove()` the rest."""
        width = output.in_features
        if kept.numel() < width:  # with nothing removed the weights stay as they are
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
            remove()
            columns = slice(None) if self.config.shrink else kept.to(output.weight.device)
            if refit is not None:
                output.weight[:, columns] = refit
            if shift is not None:
                output.bias.add_(shift)
        for m in matrices:
            results[m.name] = {"rule": self.rule(m.name), **info}

    def _head_units(self, linears: dict[str, Matrix]) -> list[HeadGroups]:
        return head_units(linears, self.key_value_groups) if self.config.prune_heads else []

    def statistics_bytes(self, linears: dict[str, Matrix]) -> int:
        return self.scorer.statistics_bytes(linears) + self._moments_bytes(linears)

    def _outputs(self, linears: dict[str, Matrix]) -> list[Matrix]:
        """The output matrices whose columns go: each MLP's, each attention's when heads go too."""
        return [u.output for u in mlp_units(linears)] + [h.output for h in self._head_units(linears)]

    def _moments_bytes(self, linears: dict[str, Matrix]) -> int:
        """float64 sums, squares and shift per input column of each output matrix, and H when refitting."""
        return sum(m.in_features * 24 + (m.in_features ** 2 * 8 if self.refit else 0) for m in self._outputs(linears))

    def memory_bytes(self, linears: dict[str, Matrix], compute_dtype: torch.dtype, device_type: str) -> dict[str, int]:
        """The scorer's own terms with the moments on top; then, one after the other, the neuron scores
        (float64 copies of a unit's largest matrix) and the refit (`refit_bytes`)."""
        scorer = self.scorer.memory_bytes(linears, compute_dtype, device_type)
        moments = self._moments_bytes(linears)
        units = [(u.matrices, u.output, kept_width(u.neurons, self.config.sparsity_ratio)) for u in mlp_units(linears)]
        units += [([*h.inputs, h.output], h.output, kept_groups(h.groups, self.config.prune_heads) * h.columns_per_group)
                  for h in self._head_units(linears)]
        if not units:
            return scorer
        scores = max(2 * 8 * m.weight.numel() for matrices, _, _ in units for m in matrices)
        refit = max(refit_bytes(output.in_features, kept, output.out_features, output.bias is not None)
                    for _, output, kept in units) if self.refit else 0
        return {"statistics": scorer["statistics"] + moments,
                "prune": max(scorer["prune"], scorer["statistics"]) + moments + max(scores, refit)}
