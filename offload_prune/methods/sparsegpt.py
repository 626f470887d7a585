"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning with weight updates, column block by block.

For a linear layer W [rows, cols] and calibration inputs x (one column per token):

    H = (2/n) sum_x x x^T                       n = number of calibration sequences
    U = chol((H + lambda I)^-1), upper          lambda = percdamp * mean(diag H)
    for each block of `blocksize` columns:
        choose the mask once for the block (unstructured: the lowest w_j^2 / U_jj^2 of the block;
        N:M: the N lowest of every M columns, chosen when the M-group starts)
        for each column j:   err_j = (w_j - q_j) / U_jj,  W[:, j:block_end] -= err_j U[j, j:block_end]
        W[:, block_end:] -= Err_block U[block, block_end:]          (lazy update of later columns)

Since (H + lambda I)^-1 = U^T U and W - W_pruned = Err U, the added output error
tr(dW (H + lambda I) dW^T) is exactly ||Err||^2: the per-module reconstruction error comes for
free, with the damping and dead-column terms taken back out.

Linears that read the same input tensor (q/k/v, gate/up) share one Hessian and one factor U.
"""
from __future__ import annotations

import logging
import time

import torch

from ..config import OffloadPruneError, PruneConfig
from ..model.matrices import Matrix
from ..runtime.distributed import Ranks
from ..runtime.hessian_sums import CompensatedSum, Float32Sum, no_tf32
from ..runtime.masks import lowest_k, row_chunks
from .base import PruningMethod

log = logging.getLogger(__name__)
MAX_DAMPING_RETRIES = 6



def inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + lambda I)^-1, holding at most two [cols, cols] matrices at once:
    H goes as soon as its factor L exists (pass the only reference), L as soon as the inverse does;
    in the rare case that the second factorisation fails, H is rebuilt from the inverse. A
    non-positive-definite H is retried with tenfold damping, never silently replaced."""
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = hessian[diagonal, diagonal].mean().item()
    fraction = percdamp if percdamp > 0 else 1e-8
    added = 0.0
    for retry in range(MAX_DAMPING_RETRIES + 1):
        damping = fraction * 10 ** retry * mean_diag
        hessian[diagonal, diagonal] += damping - added
        added = damping
        lower, info = torch.linalg.cholesky_ex(hessian)
        if info != 0:
            continue
        del hessian
        inverse = torch.cholesky_inverse(lower)
        del lower
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if info == 0:
            return upper, damping, retry
        hessian = torch.linalg.inv(inverse)  # noqa: F841 (read by the next retry)
    raise OffloadPruneError(f"Hessian not positive definite even with damping {added:.3g} "
                            f"({fraction * 10 ** MAX_DAMPING_RETRIES:g} x mean diagonal)")


@torch.no_grad()
def output_energy(weight: torch.Tensor, hessian: torch.Tensor, dead: torch.Tensor) -> float:
    """tr(W H W^T) = (2/n) sum over tokens of ||W x||^2 for H = (2/n) sum x x^T: the output energy
    without running the matrix on the calibration windows. Dead inputs (always zero; H holds 1 on their
    diagonal) count nothing. A chunk of rows at a time, whose two temporaries together take half the
    factor of H that the plan counts beside H (it does not exist yet)."""
    total = 0.0
    for rows in row_chunks(*weight.shape, weight.shape[1] ** 2 // 4):
        part = weight[rows].to(torch.float32, copy=True).masked_fill_(dead[None, :], 0)
        total += float(torch.vdot((part @ hessian).flatten(), part.flatten()))
    return total


@torch.no_grad()
def prune_with_obs(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, sparsity: float,
                   nm: tuple[int, int] | None, blocksize: int, rounder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a float32 weight given the factor U; returns (pruned weight, squared errors per row). With a
    `rounder(block, kept, j, column)`, each kept weight is also put on the quantization grid as its column
    is reached (the SparseGPT paper's joint sparsification and quantization): the rounding error is fed
    back through the same update as the pruning error."""
    w = weight.clone()
    w[:, dead] = 0
    rows, cols = w.shape
    errors = torch.zeros(rows, device=w.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, u = w[:, start:end].clone(), upper[start:end, start:end]
        u_diag = torch.diag(u)
        err_block = torch.zeros_like(block)
        if nm is None:
            saliency = block ** 2 / u_diag[None, :] ** 2
            mask = lowest_k(saliency.reshape(1, -1), int(saliency.numel() * sparsity)).reshape(saliency.shape)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                mask[:, group] = lowest_k(block[:, group] ** 2 / u_diag[None, group] ** 2, nm[0])
            column = block[:, j]
            kept = column.masked_fill(mask[:, j], 0) if rounder is None else rounder(block, ~mask, j, start + j)
            err = (column - kept) / u_diag[j]
            block[:, j:].sub_(torch.outer(err, u[j, j:]))
            block[:, j] = kept  # exact zeros, not the rounding residue of the update
            err_block[:, j] = err
        w[:, start:end] = block
        w[:, end:] -= err_block @ upper[start:end, end:]
        errors += (err_block ** 2).sum(dim=1)
    return w, errors


class SparseGPT(PruningMethod):
    options = ("blocksize", "percdamp", "true_sequential", "hessian_dtype")
    runs_on_ranks = True
    reads_outputs = False  # the Hessian gives the output energy the error is reported against

    def __init__(self, config: PruneConfig, share_hessians: bool = True):
        super().__init__(config)
        self.share_hessians = share_hessians
        self.sum_type = CompensatedSum if config.hessian_dtype == "float64" else Float32Sum
        self.hessians: dict[str, Float32Sum | CompensatedSum] = {}  # input key -> sum of x x^T
        self.sequences: dict[str, int] = {}             # input key -> calibration sequences seen
        self.input_key: dict[str, str] = {}             # linear -> input key
        self._last: tuple[torch.Tensor, str] | None = None
        self._make_rounder = None  # --quant-joint: quantize in the pruning sweep
        self.rounded: dict[str, object] = {}  # linear -> its rounder, once pruned and quantized

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        """All matrices together, or with --true-sequential one stage at a time in the order the block
        calls them (q/k/v, o, gate/up, down). Experts' Hessians are then split across passes so a pass
        holds no more of them than the block's other Hessians take (at least one expert): a
        128-expert layer never holds 128 Hessians at once."""
        if self.config.true_sequential:
            stages = sorted({m.stage for m in linears.values()})
            together = [[n for n, m in linears.items() if m.stage == stage] for stage in stages]
        else:
            together = [list(linears)]
        dense = [n for n, m in linears.items() if m.expert is None]
        per_expert: dict[tuple[str, int], int] = {}
        for m in linears.values():
            if m.expert is not None:
                key = (m.unit, m.expert)
                per_expert[key] = per_expert.get(key, 0) + self._square_bytes(m)
        budget = max([self._hessian_bytes({n: linears[n] for n in dense}), *per_expert.values()])
        passes = []
        for group in together:
            plain = [n for n in group if linears[n].expert is None]
            passes += [plain] if plain else []
            chunk, size = [], 0
            for key in dict.fromkeys((linears[n].unit, linears[n].expert) for n in group if n not in plain):
                names = [n for n in group if (linears[n].unit, linears[n].expert) == key]
                cost = sum(self._square_bytes(linears[n]) for n in names)
                if chunk and size + cost > budget:
                    passes.append(chunk)
                    chunk, size = [], 0
                chunk += names
                size += cost
            passes += [chunk] if chunk else []
        return passes

    @staticmethod
    def _shared_inputs(linears: dict[str, Matrix]) -> list[list[Matrix]]:
        """Matrices that share one Hessian: those of one stage reading one tensor; each expert its own."""
        inputs: dict[object, list[Matrix]] = {}
        for name, m in linears.items():
            inputs.setdefault(name if m.expert is not None else ("stage", m.stage), []).append(m)
        return list(inputs.values())

    def round_while_pruning(self, make_rounder) -> bool:
        self._make_rounder = make_rounder
        return True

    def solve_units(self, names: list[str]) -> list[list[str]]:
        """Matrices sharing a Hessian are solved on one rank: one factorisation serves them all."""
        units: dict[str, list[str]] = {}
        for name in names:
            units.setdefault(self.input_key.get(name, name), []).append(name)
        return list(units.values())

    def _square_bytes(self, matrix: Matrix) -> int:
        """One Hessian of this matrix's input, as accumulated."""
        return matrix.in_features ** 2 * self.sum_type.bytes_per_entry

    def _hessian_bytes(self, linears: dict[str, Matrix]) -> int:
        return sum(self._square_bytes(members[0]) for members in self._shared_inputs(linears))

    #: float32 [cols, cols] matrices alive while one input's Hessian is factorised (H and its factor, then
    #: the factor and the inverse), and while that input's matrices are pruned (the factor).
    squares_factorising, squares_pruning = 2, 1
    #: On CUDA, torch.cholesky_inverse solves against an identity through cuSOLVER: the factor, the identity
    #: and the result exist at once, one square more than LAPACK's in-place inverse on the CPU.
    cuda_inverse_squares = 1

    def memory_bytes(self, linears: dict[str, Matrix], compute_dtype: torch.dtype, device_type: str) -> dict[str, int]:
        """Hessians are [cols, cols] in hessian_dtype, one per shared input (q/k/v and gate/up share
        theirs), alive together through a pass; the ones not yet used stay alive while one is factorised
        and its matrices pruned. A float64 sum is rounded to float32 first: both exist for a moment."""
        statistics, prune_peak = 0, 0
        for group in self.groups(linears):
            shared = self._shared_inputs({n: linears[n] for n in group})
            sizes = [self._square_bytes(members[0]) for members in shared]
            statistics = max(statistics, sum(sizes))
            for k, members in enumerate(shared):
                later = sum(sizes[k + 1:])
                square = members[0].in_features ** 2 * 4
                rounding = sizes[k] + self.sum_type.rounding_bytes(members[0].in_features)
                per_matrix = max(self._pruning_bytes(m, compute_dtype, device_type) for m in members)
                factorising = self.squares_factorising + (self.cuda_inverse_squares if device_type == "cuda" else 0)
                prune_peak = max(prune_peak, later + rounding, later + factorising * square,
                                 later + self.squares_pruning * square + per_matrix)
        return {"statistics": statistics, "prune": prune_peak}

    def _pruning_bytes(self, matrix: Matrix, compute_dtype: torch.dtype, device_type: str) -> int:
        """Pruning one matrix: a float32 copy of W (two when W is not float32), the W-sized temporary
        of the first lazy column update and a few column blocks."""
        copies = 2 if compute_dtype == torch.float32 else 3
        return matrix.weight.numel() * 4 * copies + matrix.out_features * self.config.blocksize * 4 * 4

    def reduce_statistics(self, ranks: Ranks, linears: dict[str, Matrix]) -> None:
        """Hessians and sequence counts over the ranks. Which matrices share a Hessian is
        taken from any rank that fed them: a rank no token of whose windows reached an expert starts it
        from zeros."""
        for keys in ranks.gather({n: self.input_key[n] for n in linears if n in self.input_key}):
            for name, key in keys.items():
                self.input_key.setdefault(name, key)
        for name in linears:
            self.input_key.setdefault(name, name)  # fed on no rank: starved, pruned by magnitude
        shared = list(dict.fromkeys(self.input_key[n] for n in linears))
        sizes = {self.input_key[n]: (linears[n].in_features, linears[n].weight.device) for n in linears}
        for key in shared:
            if key not in self.hessians:
                self.hessians[key] = self.sum_type(*sizes[key])
            self.hessians[key].reduce(ranks)
        self.sequences.update(ranks.sum_counts(self.sequences, shared))

    def discard(self, names: list[str]) -> None:
        self._last = None  # no later micro-batch is this group's
        for name in names:
            key = self.input_key.pop(name, None)
            if key is not None and key not in self.input_key.values():
                self.hessians.pop(key, None)
                self.sequences.pop(key, None)

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        if self.share_hessians and self._last is not None and inputs is self._last[0]:
            key = self._last[1]
        else:
            key = name
            self._last = (inputs, name)
            if key not in self.hessians:
                self.hessians[key] = self.sum_type(inputs.shape[-1], inputs.device)
                self.sequences[key] = 0
            self.hessians[key].add(inputs)
            self.sequences[key] += inputs.shape[0] if inputs.dim() > 2 else 1
        self.input_key[name] = key

    @torch.no_grad()
    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        self._last = None
        results: dict[str, dict] = {}
        by_key: dict[str, list[str]] = {}
        for name in linears:
            if name not in self.input_key:
                raise OffloadPruneError(f"{name}: no calibration input reached this linear layer")
            by_key.setdefault(self.input_key.pop(name), []).append(name)
        with no_tf32():
            for key, names in by_key.items():
                dead = self.hessians[key].diagonal() == 0  # inputs always zero: their weights are zeroed
                results.update(self._prune_sharing(key, dead, {m: linears[m] for m in names}, sparsity))
        return results

    def _prune_sharing(self, key: str, dead: torch.Tensor, linears: dict[str, Matrix],
                       sparsity: float) -> dict[str, dict]:
        """Prune the matrices that read input `key`, given its normalised Hessian (popped here, so the
        factorisation holds the only reference and can free it early)."""
        held = [self.take_hessian(key, dead)]
        energies = {name: output_energy(linear.weight, held[0], dead) for name, linear in linears.items()}
        # The factorisation is handed the only reference to H, so that it can free H early.
        upper, damping, retries = inverse_cholesky(held.pop(), self.config.percdamp)
        if retries:
            log.warning("%s: Hessian needed damping %.3g (%d retries)", ", ".join(linears), damping, retries)
        return {name: self._prune_linear(name, linear, upper, dead, damping, retries, energies[name], sparsity)
                for name, linear in linears.items()}

    def take_hessian(self, key: str, dead: torch.Tensor) -> torch.Tensor:
        """H = (2/n) sum x x^T of `key` in float32, which the solves use, with diag 1 for the `dead`
        inputs; the caller holds the only reference (a float64 sum is freed once it is rounded)."""
        hessian = self.hessians.pop(key).rounded()
        hessian *= 2 / self.sequences.pop(key)
        hessian[dead, dead] = 1
        return hessian

    def _prune_linear(self, name, linear, upper, dead, damping, retries, energy, sparsity) -> dict:
        start = time.perf_counter()
        original = linear.weight
        rounder = self._make_rounder(name, linear) if self._make_rounder else None
        pruned, errors = prune_with_obs(original.float(), upper, dead, sparsity,
                                        self.config.nm, self.config.blocksize, rounder)
        if rounder is not None:
            self.rounded[name] = rounder
        # ||Err||^2 = tr(dW (H' + damping I) dW^T), H' = H with 1 on dead diagonals: take both back out.
        # Chunks of ~4M weights keep the difference from costing weight-sized temporaries.
        change, dead_change = 0.0, 0.0
        rows = max(1, (1 << 22) // original.shape[1])
        for o, p in zip(original.split(rows), pruned.split(rows)):
            d = o.float() - p
            change += float((d * d).sum())
            dead_change += float((d[:, dead] ** 2).sum())
        added_error = float(errors.sum()) - damping * change - dead_change
        linear.weight.copy_(pruned.to(linear.weight.dtype))
        if linear.weight.device.type == "cuda":
            torch.cuda.synchronize(linear.weight.device)
        return {"reconstruction_error": max(added_error, 0.0) / energy if energy > 0 else 0.0,
                "damping": damping, "cholesky_retries": retries, "seconds": time.perf_counter() - start}
