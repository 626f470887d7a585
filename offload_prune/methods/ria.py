"""RIA, Relative Importance and Activations (Zhang et al., "Plug-and-Play", ICLR 2024).

    score_ij = (|W_ij| / sum_k |W_ik|  +  |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a        a = --ria-exponent

compared within each output row, as Wanda. A weight counts relative to both the row it feeds and
the input channel it reads, so a channel whose weights are all small is not emptied at once.

Channel permutation (--ria-permute, N:M only). An N:M group is M consecutive inputs; where
important inputs crowd into one group, some must go. The inputs of an MLP's output matrix are its
neurons, and reordering neurons (the output matrix's columns with the rows, and biases, of the
unit's input matrices) leaves the block's function unchanged. So each MLP's neurons are dealt out
by total score like cards (neuron of rank r goes to group r mod groups): important neurons land in
different groups. The new order is kept only where N:M then keeps more score than in the old one. The model is
written in the new order: its N:M pattern holds as stored. Attention and residual-stream inputs
are not permuted: that would need the permutation applied across blocks.
"""
from __future__ import annotations

import torch

from ..model.matrices import Matrix
from ..runtime.masks import chunks_of, lowest_k
from ..surgery.neurons import neuron_rows
from .wanda import Wanda


def column_sums(weight: torch.Tensor) -> torch.Tensor:
    chunks = chunks_of(weight)
    return sum(weight[rows].float().abs().sum(dim=0) for rows in chunks)


def ria_scores(weight: torch.Tensor, rows: slice, columns: torch.Tensor, input_norm: torch.Tensor,
               exponent: float) -> torch.Tensor:
    w = weight[rows].float().abs()
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) \
        + w / columns.clamp_min(torch.finfo(torch.float32).tiny)[None, :]
    return relative.mul_(input_norm.pow(exponent)[None, :])


def kept_score(scores: torch.Tensor, nm: tuple[int, int]) -> float:
    """Sum of the scores N:M keeps (the M - N highest of every M consecutive inputs)."""
    n, m = nm
    grouped = scores.reshape(scores.shape[0], -1, m)
    return float(grouped.masked_fill(lowest_k(grouped, n), 0).sum())


def deal_out(importance: torch.Tensor, m: int) -> torch.Tensor:
    """A column order in which ranks 0..groups-1 open each group, the next ranks come second, ..."""
    groups = importance.numel() // m
    ranked = importance.argsort(descending=True, stable=True)
    return ranked.reshape(m, groups).T.reshape(-1)


def neuron_row_order(order: torch.Tensor, rows: int, interleaved: bool) -> torch.Tensor:
    """The row order of a matrix whose rows hold rows / neurons projections of each neuron."""
    return neuron_rows(order, rows // order.numel(), order.numel(), interleaved)


class RIA(Wanda):
    options = ("ria_exponent", "ria_permute")

    def solve_units(self, names: list[str]) -> list[list[str]]:
        # The permutation reorders an MLP's input and output matrices together.
        return [list(names)] if self.config.ria_permute else super().solve_units(names)

    def scorer(self, name: str, weight: torch.Tensor):
        input_norm = self.sum_squares.pop(name).sqrt().to(weight.device, torch.float32)
        columns = column_sums(weight)
        return lambda rows: ria_scores(weight, rows, columns, input_norm, self.config.ria_exponent)

    @torch.no_grad()
    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        permuted = self._permute_neurons(linears) if self.config.ria_permute else {}
        results = super().prune(linears, sparsity)
        for name, gain in permuted.items():
            results[name]["permutation_gain"] = gain
        return results

    def _permute_neurons(self, linears: dict[str, Matrix]) -> dict[str, float]:
        """Reorder each MLP unit's neurons (see the module's text); returns the kept-score gain per unit's
        output matrix (1.0 = kept the original order)."""
        gains = {}
        for name, output in linears.items():
            if output.kind != "mlp" or output.position != "out":
                continue
            members = [m for m in linears.values() if m.unit == output.unit and m.position == "in"]
            weight = output.weight
            if weight.shape[1] % self.config.nm[1]:
                continue  # zero_lowest refuses this width with a clear message
            norm = self.sum_squares[name].sqrt().to(weight.device, torch.float32)
            scores = ria_scores(weight, slice(None), column_sums(weight), norm, self.config.ria_exponent)
            order = deal_out(scores.sum(dim=0), self.config.nm[1])
            before, after = kept_score(scores, self.config.nm), kept_score(scores[:, order], self.config.nm)
            gains[name] = after / before if before > 0 else 1.0
            if after <= before:
                gains[name] = 1.0
                continue
            weight.copy_(weight[:, order.to(weight.device)])
            self.sum_squares[name] = self.sum_squares[name][order.to(self.sum_squares[name].device)]
            for member in members:
                rows = neuron_row_order(order, member.out_features, member.interleaved).to(member.weight.device)
                member.weight.copy_(member.weight[rows])
                if member.bias is not None:
                    member.bias.copy_(member.bias[rows])
        return gains
