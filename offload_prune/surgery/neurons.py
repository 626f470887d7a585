"""Whole MLP neurons: which matrices hold each neuron, removing neurons (the matrices shrink) or
zeroing them (the shapes stay), and the least-squares update of the output matrix on the kept ones.

A unit is one MLP as `matrices.describe` finds it: its input matrices (gate/up, a fused gate_up,
fc1, c_fc), whose rows are its neurons, and its output matrix (down, fc2, c_proj), whose columns
are. Removing neuron n removes its rows (both halves of a fused gate_up) and its column.

The output matrix can be refitted on the kept neurons: with X the output matrix's input over the
calibration tokens (its H = sum x x^T and sum x), W' = argmin ||W X - W' X_S|| is
W H[:, S] (H_SS + damping)^-1. When the output matrix has a bias, the fit has an intercept: centred
statistics, and the bias takes W mu - W' mu_S (FLAP's bias compensation is the case W' = W_S).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import OffloadPruneError
from ..model.matrices import Matrix, describe, find_matrices
from ..model.skeleton import build_skeleton

#: The kept width is a multiple of this (tensor-core and SIMD friendly, as the issue asks).
WIDTH_MULTIPLE = 8


@dataclass
class MlpUnit:
    name: str
    inputs: list[Matrix]   # rows are neurons
    output: Matrix         # columns are neurons

    @property
    def neurons(self) -> int:
        return self.output.in_features

    @property
    def matrices(self) -> list[Matrix]:
        return [*self.inputs, self.output]


def mlp_units(matrices: dict[str, Matrix]) -> list[MlpUnit]:
    """The MLP units among these matrices (experts each their own unit)."""
    units = []
    for output in matrices.values():
        if output.kind == "mlp" and output.position == "out":
            inputs = [m for m in matrices.values() if m.unit == output.unit and m.position == "in" and m.kind == "mlp"]
            if inputs:
                units.append(MlpUnit(output.unit, inputs, output))
    return units


def kept_width(neurons: int, ratio: float) -> int:
    """(1 - ratio) x neurons, rounded to a multiple of WIDTH_MULTIPLE, at least one multiple."""
    if neurons <= WIDTH_MULTIPLE:
        return max(1, round((1 - ratio) * neurons))
    return min(neurons, max(WIDTH_MULTIPLE, round((1 - ratio) * neurons / WIDTH_MULTIPLE) * WIDTH_MULTIPLE))


def highest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, ascending (ties: the lower index is kept)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:count]
    return torch.sort(order).values


def rows_of(neurons: torch.Tensor, matrix: Matrix, width: int) -> torch.Tensor:
    """Rows of an input matrix that belong to these neurons: k rows per neuron when projections are
    fused ([gate..., up...] or interleaved [gate0, up0, ...])."""
    return neuron_rows(neurons, matrix.out_features // width, width, matrix.interleaved)


def neuron_rows(neurons: torch.Tensor, k: int, width: int, interleaved: bool) -> torch.Tensor:
    """The rows of `neurons` (on their device) in a matrix of k rows for each of `width` neurons."""
    if k == 1:
        return neurons
    offsets = torch.arange(k, device=neurons.device)
    if interleaved:
        return (neurons[:, None] * k + offsets).reshape(-1)
    return (offsets[:, None] * width + neurons).reshape(-1)


def fold_rows(values: torch.Tensor, matrix: Matrix, width: int) -> torch.Tensor:
    """Per-row values of an input matrix summed onto their neurons."""
    k = values.numel() // width
    return values.reshape(width, k).sum(1) if matrix.interleaved else values.reshape(k, width).sum(0)


def neuron_norms(unit: MlpUnit) -> torch.Tensor:
    """L2 norm of each neuron's weights (its rows and its column), float64."""
    squares = unit.output.weight.double().pow(2).sum(0)
    for m in unit.inputs:
        squares += fold_rows(m.weight.double().pow(2).sum(1), m, unit.neurons)
    return squares.sqrt()


@dataclass
class InputMoments:
    """Of the output matrix's input (one value per neuron), over the calibration tokens. The sums are
    taken about a shift, the first micro-batch's mean: E[x^2] - E[x]^2 in float32 (a GPU's statistics)
    cancels away the variance of a neuron whose mean is large beside its spread (mean 8, std 1e-3:
    1.9e-5 for 3.8e-7), and those quiet neurons are the ones FLAP removes first."""
    tokens: int
    sums: torch.Tensor                  # sum (x - shift) [n]
    squares: torch.Tensor               # sum (x - shift)^2 [n]
    shift: torch.Tensor | None = None   # [n], set by the first add
    gram: torch.Tensor | None = None    # sum (x - shift)(x - shift)^T [n, n], when the output matrix is refitted

    def add(self, x: torch.Tensor, with_gram: bool) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sums.dtype)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.tokens += x.shape[0]
        self.sums += x.sum(0)
        self.squares += (x * x).sum(0)
        if with_gram:
            self.gram = x.T @ x if self.gram is None else self.gram.addmm_(x.T, x)

    @classmethod
    def empty(cls, n: int, device: torch.device, dtype: torch.dtype | None = None) -> "InputMoments":
        dtype = dtype or statistics_dtype(device)
        return cls(0, torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device))

    @property
    def mean(self) -> torch.Tensor:
        offset = self.sums / max(self.tokens, 1)
        return offset if self.shift is None else offset + self.shift

    @property
    def variance(self) -> torch.Tensor:
        offset = self.sums / max(self.tokens, 1)
        return (self.squares / max(self.tokens, 1) - offset ** 2).clamp_min(0)

    def gram_columns(self, kept: torch.Tensor, centred: bool, dtype: torch.dtype) -> torch.Tensor:
        """Columns `kept` of sum x x^T, or with `centred` of the covariance sum (x - mean)(x - mean)^T / n,
        made from the shifted sums without a second [n, n] matrix."""
        columns = self.gram[:, kept].to(dtype)
        sums, shift, n = self.sums.to(dtype), self.shift.to(dtype), self.tokens
        if centred:
            offset = sums / n
            return columns.div_(n).addr_(offset, offset[kept], alpha=-1)
        return columns.addr_(shift, sums[kept]).addr_(sums, shift[kept]).addr_(shift, shift[kept], alpha=n)


def refit_output(weight: torch.Tensor, moments: InputMoments, kept: torch.Tensor, with_bias: bool,
                 percdamp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares output weights on the kept neurons, and the bias shift when there is a bias (the
    intercept absorbs the means: the centred inputs are fitted). Memory beyond the moments (n inputs, k
    kept, `out` rows; `refit_bytes` counts it): W and H[:, S] while W H[:, S] is made, then H_SS and its
    Cholesky factor with the right-hand sides."""
    w = weight.double() if weight.device.type == "cpu" else weight.float()
    shift = None
    if with_bias:
        mean = moments.mean.to(w.dtype)
        shift = w @ mean
    columns = moments.gram_columns(kept, with_bias, w.dtype)    # H[:, S]
    right = w @ columns                                          # W H[:, S], [out, k]
    del w
    system = columns[kept]                                       # H_SS
    del columns
    system.diagonal().add_(percdamp * torch.diagonal(system).mean().clamp_min(1e-12))
    factor, info = torch.linalg.cholesky_ex(system)
    refit = (torch.cholesky_solve(right.T, factor) if not info else torch.linalg.solve(system, right.T)).T
    if with_bias:
        shift -= refit @ mean[kept]
    return refit.to(weight.dtype), (shift.to(weight.dtype) if shift is not None else None)


def refit_bytes(width: int, kept: int, out: int, with_bias: bool) -> int:
    """Peak bytes of `refit_output` beyond the moments, in float64 (CPU) terms."""
    building = out * width + width * kept + out * kept + kept * kept
    solving = 2 * kept * kept + 2 * out * kept
    return 8 * max(building, solving)


def statistics_dtype(device: torch.device) -> torch.dtype:
    """The dtype per-input statistics (sums of squares, moments) are summed in: float64 on the CPU, so a
    sum does not depend on how tokens were split into micro-batches; float32 on a GPU, where float64 runs
    at a small fraction of the speed."""
    return torch.float64 if device.type == "cpu" else torch.float32


def compensation(weight: torch.Tensor, moments: InputMoments, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: what the removed neurons add on average, W[:, removed] mu_removed."""
    w = weight.double() if weight.device.type == "cpu" else weight.float()
    return (w[:, removed] @ moments.mean.to(w.dtype)[removed]).to(weight.dtype)


# -- changing the matrices ---------------------------------------------------------------------
def zero_neurons(unit: MlpUnit, kept: torch.Tensor) -> None:
    removed = torch.ones(unit.neurons, dtype=torch.bool)
    removed[kept] = False
    removed = torch.nonzero(removed).flatten()
    for m in unit.inputs:
        m.weight[rows_of(removed, m, unit.neurons).to(m.weight.device)] = 0
    unit.output.weight[:, removed.to(unit.output.weight.device)] = 0


def shrink_neurons(unit: MlpUnit, kept: torch.Tensor) -> None:
    """Replace the unit's parameters by ones holding only the kept neurons (sizes the modules report
    follow: nn.Linear's in/out_features, Conv1D's nf)."""
    width = unit.neurons
    for m in unit.inputs:
        select(m, rows_of(kept, m, width), along_rows=True)
    select(unit.output, kept, along_rows=False)


def select(matrix: Matrix, index: torch.Tensor, along_rows: bool) -> None:
    """Keep only these rows (with their bias) or columns of the matrix, in a new parameter."""
    from transformers.pytorch_utils import Conv1D
    module = matrix.module
    if matrix.expert is not None:
        raise OffloadPruneError(f"{matrix.name}: removing neurons of experts is not supported (--shrink); "
                                "without --shrink they are zeroed")
    transposed = isinstance(module, Conv1D)  # stored [in, out]
    dim = (0 if along_rows else 1) ^ transposed
    weight = module.weight.data.index_select(dim, index.to(module.weight.device))
    module.weight = nn.Parameter(weight, requires_grad=False)
    if along_rows and module.bias is not None:
        module.bias = nn.Parameter(module.bias.data.index_select(0, index.to(module.bias.device)), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    if transposed:
        module.nf = weight.shape[1]
    matrix.weight = weight.t() if transposed else weight
    matrix.bias = module.bias


# -- the config ----------------------------------------------------------------------------------
def width_setting(model_config, ratio: float) -> dict[str, int]:
    """The config.json change that gives every MLP the kept width: {setting: kept width}. The setting
    that holds the width is found by asking transformers: the one whose change builds exactly the
    shrunk block (a meta copy of block 0 shrunk the way the run shrinks every block)."""
    _, _, layers = build_skeleton(model_config)
    shrunk = layers[0]
    matrices = find_matrices(shrunk)
    describe(shrunk, matrices)
    units = mlp_units({n: m for n, m in matrices.items() if m.kind == "mlp"})
    if not units:
        raise OffloadPruneError("--shrink: no MLP with an input and an output matrix in the blocks")
    widths = {u.neurons for u in units}
    if len(widths) > 1 or any(m.expert is not None for u in units for m in u.matrices):
        raise OffloadPruneError("--shrink: Mixture-of-Experts MLPs are not supported (every layer must share one "
                                "width); without --shrink the neurons are zeroed")
    width = widths.pop()
    kept = kept_width(width, ratio)
    for unit in units:
        shrink_neurons(unit, torch.arange(kept))
    wanted = {n: tuple(p.shape) for n, p in shrunk.named_parameters()}
    settings = model_config.to_dict()
    candidates = [k for k, v in settings.items() if v == width and type(v) is int]
    candidates += [k for k, v in settings.items() if v is None]  # GPT-2's n_inner: None means 4 x n_embd
    for key in candidates:
        try:
            _, _, layers = build_skeleton(type(model_config).from_dict({**settings, key: kept}))
        except Exception:  # a setting that does not take this value
            continue
        if all({n: tuple(p.shape) for n, p in layer.named_parameters()} == wanted for layer in layers):
            return {key: kept}
    raise OffloadPruneError(f"--shrink: no setting in config.json gives the MLP {kept} neurons instead of {width}; "
                            "without --shrink the neurons are zeroed")
