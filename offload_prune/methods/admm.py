"""ADMM weight update with gradual mask selection (Boža, "Fast and Effective Weight Update for Pruned
Large Language Models", TMLR 2024).

For a linear W [rows, cols] with calibration Hessian H = (2/n) sum x x^T, find W' zero outside a mask M
that minimises the damped output error

    (W - W') (H + delta Diag(H)) (W - W')^T,        delta = DAMPING

In coordinates where every input has unit norm (D = diag(H)^1/2, V = W D, G = D^-1 H D^-1 + delta I,
so |V_ij| is Wanda's score) ADMM splits W' into V (the least-squares side) and Z (the masked side):

    V <- (G + rho I)^-1 (G V0 + rho (Z - U))       one factorisation of G + rho I per input, shared by
    Z <- (V + U) * M                              every matrix reading it (q/k/v, gate/up)
    U <- U + V - Z

The mask is chosen gradually: at iteration t < T (T = 3/4 of the iterations) the |V + U| below the
cubic schedule s_t = s (1 - (1 - (t+1)/T)^3) are masked, per output row (Wanda's comparison group); for
N:M the candidates are the N lowest of every M, and the schedule takes a growing share of them. The
remaining iterations refine the weights on the final mask; the result converges to the masked
least-squares solution, row by row W'_S = W H_S (H_SS)^-1 with S the row's kept inputs.
"""
from __future__ import annotations

import time

import torch

from ..model.matrices import Matrix
from ..runtime.masks import CHUNK_ELEMENTS, ScoreRows, chunk_elements, chunk_workspace_bytes, lowest_k, row_chunks
from .sparsegpt import SparseGPT

#: The paper's damping: H + 0.1 Diag(H), i.e. 0.1 I once inputs are normalised.
DAMPING = 0.1
#: Share of the iterations over which the mask grows to its final sparsity (the paper: 15 of 20).
GRADUAL_SHARE = 0.75


def schedule(iteration: int, ramp: int) -> float:
    """Fraction of the final pruned count masked at this iteration (cubic, reaches 1 at `ramp`)."""
    return 1.0 - (1.0 - min(iteration + 1, ramp) / ramp) ** 3


def choose_mask(scores: ScoreRows, shape: tuple[int, int], sparsity: float, nm: tuple[int, int] | None,
                fraction: float, device: torch.device) -> torch.Tensor:
    """True where a weight is pruned: per row, `fraction` of the final count, lowest scores first
    (scores made a chunk of rows at a time, so the selection's temporaries stay small)."""
    rows, cols = shape
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    for chunk in row_chunks(rows, cols, chunk_elements(device.type)):
        part = scores(chunk)
        if nm is None:
            mask[chunk] = lowest_k(part, int(cols * sparsity * fraction))
            continue
        n, m = nm
        candidates = lowest_k(part.reshape(-1, cols // m, m), n).reshape(part.shape)
        mask[chunk] = lowest_k(part.masked_fill_(~candidates, float("inf")), int(cols // m * n * fraction))
    return mask


def normalised_system(hessian: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, G, (G + rho I)^-1) from H, which is overwritten (it becomes G); at most three [cols, cols]
    matrices exist at once."""
    norms = hessian.diagonal().sqrt()
    gram = hessian.div_(norms[:, None]).div_(norms[None, :])
    gram.diagonal().add_(DAMPING)
    factor = gram.clone()
    factor.diagonal().add_(rho)
    factor = torch.linalg.cholesky(factor)
    inverse = torch.cholesky_inverse(factor)
    return norms, gram, inverse


@torch.no_grad()
def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
               iterations: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, pruned mask) for one matrix, computed in the dtype of the inputs. `hessian` has no
    zero diagonal (dead inputs get 1 and their weights 0, as SparseGPT does)."""
    norms, gram, inverse = normalised_system(hessian.clone(), rho)
    masked, mask = _iterate(weight * norms[None, :], gram, inverse, sparsity, nm, iterations, rho)
    return masked.div_(norms[None, :]), mask


def _iterate(v: torch.Tensor, gram: torch.Tensor, inverse: torch.Tensor, sparsity: float,
             nm: tuple[int, int] | None, iterations: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADMM iterations from V = V0 (pass the only reference: it is replaced in place); returns
    (Z, mask) in normalised coordinates. At most four matrix-sized tensors (V, V + U, U, G V0) exist
    at once."""
    target = v @ gram
    dual = torch.zeros_like(v)
    ramp = max(1, round(iterations * GRADUAL_SHARE))
    mask = None
    for iteration in range(iterations):
        masked = v + dual
        if iteration < ramp:
            mask = choose_mask(lambda rows, z=masked: z[rows].abs(), v.shape, sparsity, nm,
                               schedule(iteration, ramp), v.device)
        masked.masked_fill_(mask, 0)                                  # Z = (V + U) * M
        dual.add_(v).sub_(masked)                                     # U += V - Z
        del v
        v = masked.sub_(dual).mul_(rho).add_(target) @ inverse        # V = (G V0 + rho (Z - U)) (G + rho I)^-1
        del masked
    return v.add_(dual).masked_fill_(mask, 0), mask


class ADMM(SparseGPT):
    """Hessians collected as SparseGPT does (shared by matrices reading one input, experts split into
    passes); the pruning step is the ADMM update above."""

    options = ("true_sequential", "hessian_dtype", "admm_iterations", "admm_rho")

    # G, the factor of G + rho I and the inverse while factorising; G and the inverse while pruning.
    squares_factorising, squares_pruning = 3, 2

    def _pruning_bytes(self, matrix: Matrix, compute_dtype: torch.dtype, device_type: str) -> int:
        """Four float32 copies of W in the iterations (V, V + U, U, G V0), the mask, a chunk of scores."""
        return matrix.weight.numel() * (4 * 4 + 1) + chunk_workspace_bytes(matrix.weight.numel(), device_type)

    def round_while_pruning(self, make_rounder) -> bool:
        return False  # the mask and weights come from the iterations, not a column sweep

    def _prune_sharing(self, key: str, dead: torch.Tensor, linears: dict[str, Matrix],
                       sparsity: float) -> dict[str, dict]:
        config = self.config
        norms, gram, inverse = normalised_system(self.take_hessian(key, dead), config.admm_rho)
        results = {}
        for name, linear in linears.items():
            start = time.perf_counter()

            def normalised() -> torch.Tensor:  # V0, made again when needed rather than kept
                return linear.weight.float().masked_fill(dead[None, :], 0).mul_(norms[None, :])

            energy = _quadratic(normalised(), gram)
            masked, _ = _iterate(normalised(), gram, inverse, sparsity, config.nm, config.admm_iterations,
                                 config.admm_rho)
            error = _quadratic(normalised().sub_(masked), gram)
            linear.weight.copy_(masked.div_(norms[None, :]).to(linear.weight.dtype))
            del masked
            if linear.weight.device.type == "cuda":
                torch.cuda.synchronize(linear.weight.device)
            results[name] = {"reconstruction_error": max(error, 0.0) / energy if energy > 0 else 0.0,
                             "seconds": time.perf_counter() - start}
        return results


def _quadratic(x: torch.Tensor, gram: torch.Tensor) -> float:
    """sum over rows of x (G - delta I) x^T, the undamped output energy, a chunk of rows at a time."""
    total = 0.0
    for rows in row_chunks(*x.shape, CHUNK_ELEMENTS):  # matrix products: large chunks
        part = x[rows]
        total += float(torch.vdot((part @ gram).flatten(), part.flatten()) - DAMPING * torch.vdot(part.flatten(), part.flatten()))
    return total
