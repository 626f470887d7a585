"""Sums of x x^T over calibration tokens: the Hessians SparseGPT and ADMM collect.

`--hessian-dtype float32` (default): one float32 matrix, one matmul-add per micro-batch. Its rounding
depends on how the tokens were grouped (micro-batches, ranks), and SparseGPT's sequential solve
amplifies that: one process and 2 ranks keep ~98 % of the same weights (README, torchrun ranks).

`--hessian-dtype float64`: the float32 Hessian the solve uses is the correctly rounded value of the
exact sum of the windows' x x^T, so it is the same bit for bit whichever way the windows were grouped
or split across ranks. Each window's x x^T is computed in float64 (products of float32 inputs are exact
there; the window's own sum is one deterministic matmul) and added with Knuth's TwoSum

    s = a + b,   b' = s - a,   e = (a - (s - b')) + (b - b')        a + b = s + e exactly

into a float64 sum `hi`, the errors e into a float32 sum `lo`. hi + lo is the exact sum to within
~n^2 2^-77 of its size (n windows), whatever the order, so its float32 rounding can differ only for
an exact sum that close to a float32 rounding boundary (~n^2 2^-53 of the entries). A plain float64
sum is within ~n 2^-53 instead: rounded to float32, about one Hessian entry in 10^8 falls the other
way, and in a 30-block SmolLM2 run that was enough to change every block after it.
"""
from __future__ import annotations

import contextlib

import torch

from .distributed import Ranks
from .masks import row_chunks

#: Entries per chunk of rows: float64 temporaries of 8 MiB, large enough for the matmul of a window's
#: chunk of x x^T to run at full speed, small beside a Hessian.
CHUNK_ENTRIES = 1 << 20
#: Rows per block of a float32 sum's update: x^T x is symmetric, so only the row blocks' columns up to
#: the end of their diagonal block are computed (58-70 % of the full product at SmolLM2's widths, and
#: the same bits there: the token sums run in the same order).
TRIANGLE_ROWS = 128


@contextlib.contextmanager
def no_tf32():
    """TF32 matmuls would corrupt the Hessian and its inverse (the reference turns them off too).
    torch >= 2.9 has two APIs for it that must not be mixed: once a process has set one, reading the
    other raises, and cuBLAS reads the legacy one on every float32 matmul. So the precision is set
    through the API this process already uses: the legacy one while it still reads (the default, or
    `set_float32_matmul_precision` / `allow_tf32` by the user), else `fp32_precision`."""
    try:
        saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the process set fp32_precision: the legacy flags no longer read
        saved = None
    if saved is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]
        return
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn]
    precisions = [knob.fp32_precision for knob in knobs]
    for knob in knobs:
        knob.fp32_precision = "ieee"
    try:
        yield
    finally:
        for knob, value in zip(knobs, precisions):
            knob.fp32_precision = value


class Float32Sum:
    """sum x x^T in float32."""

    bytes_per_entry = 4

    def __init__(self, size: int, device: torch.device):
        self.total = torch.zeros(size, size, device=device)

    @staticmethod
    def rounding_bytes(size: int) -> int:
        """Memory beyond the sum while `rounded` runs."""
        return 0

    @property
    def nbytes(self) -> int:
        return self.total.nbytes

    def diagonal(self) -> torch.Tensor:
        return self.total.diagonal()

    def add(self, inputs: torch.Tensor) -> None:
        """Add x x^T of every token of `inputs` [..., size], on and below the diagonal blocks; the rest
        of the upper triangle is filled in by `rounded`."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        with no_tf32():
            for rows in self._row_blocks():
                self.total[rows, :rows.stop].addmm_(x[:, rows].T, x[:, :rows.stop])

    def _row_blocks(self) -> list[slice]:
        size = self.total.shape[0]
        return [slice(start, min(start + TRIANGLE_ROWS, size)) for start in range(0, size, TRIANGLE_ROWS)]

    def reduce(self, ranks: Ranks) -> None:
        ranks.sum_(self.total)

    def rounded(self) -> torch.Tensor:
        """The float32 sum, its upper triangle mirrored from the lower (this object's own tensor: drop
        the object to hold the only reference)."""
        for rows in self._row_blocks():
            self.total[rows, rows.stop:].copy_(self.total[rows.stop:, rows].T)
            diagonal = self.total[rows, rows]
            diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
        return self.total


class CompensatedSum:
    """sum x x^T as float64 `hi` plus float32 `lo` (see the module docstring), window by window; the
    work goes a chunk of rows at a time so that the temporaries stay small."""

    bytes_per_entry = 8 + 4

    def __init__(self, size: int, device: torch.device):
        self.hi = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.lo = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.chunks = row_chunks(size, size, CHUNK_ENTRIES)

    @staticmethod
    def rounding_bytes(size: int) -> int:
        """The float32 result, and per chunk float64 and float32 temporaries (at most five of each)."""
        return size * size * 4 + 5 * 12 * min(size * size, CHUNK_ENTRIES + size)

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes

    def diagonal(self) -> torch.Tensor:
        return self.hi.diagonal()

    def add(self, inputs: torch.Tensor) -> None:
        """Add x x^T of every token of `inputs`: [windows, tokens, size] one window at a time (the
        windows a micro-batch or a rank holds do not change what is added), [tokens, size] at once."""
        windows = inputs.detach().reshape(-1, *inputs.shape[-2:]) if inputs.dim() > 2 else inputs.detach()[None]
        for window in windows:  # float64 matmuls: TF32 does not apply
            x = window.to(torch.float64)
            for rows in self.chunks:
                self._add_exactly(rows, x[:, rows].T @ x)

    def _add_exactly(self, rows: slice, part: torch.Tensor) -> None:
        """hi[rows] + part = new hi + e exactly (TwoSum); e goes to lo. `part` is consumed."""
        hi = self.hi[rows]
        total = hi + part
        back = total - hi                      # b'
        part.sub_(back)                        # b - b'
        back.neg_().add_(total)                # s - b'
        hi.sub_(back).add_(part)               # e, in hi's place until hi takes s
        self.lo[rows].add_(hi)
        hi.copy_(total)

    def reduce(self, ranks: Ranks) -> None:
        """Every rank's (hi, lo) combined as one more exact sum, in rank order: the same on every rank."""
        if ranks.world == 1:
            return
        for rows in self.chunks:
            highs, lows = ranks.gather_tensors(self.hi[rows]), ranks.gather_tensors(self.lo[rows])
            self.hi[rows].copy_(highs[0])
            self.lo[rows].copy_(lows[0])
            for high, low in zip(highs[1:], lows[1:]):
                self.lo[rows].add_(low)
                self._add_exactly(rows, high)

    def rounded(self) -> torch.Tensor:
        """hi + lo correctly rounded to float32: hi's nearest float32, moved one step towards the
        exact sum where the remainder (hi - nearest, exact, plus lo) is more than half a step."""
        out = torch.empty(self.hi.shape, dtype=torch.float32, device=self.hi.device)
        for rows in self.chunks:
            hi = self.hi[rows]
            nearest = hi.float()
            widened = nearest.double()
            remainder = (hi - widened).add_(self.lo[rows])
            away = torch.nextafter(nearest, torch.full_like(nearest, float("inf")).copysign_(remainder.float()))
            half_step = away.double().sub_(widened).abs_().mul_(0.5)
            out[rows] = torch.where(remainder.abs_() > half_step, away, nearest)
        return out
