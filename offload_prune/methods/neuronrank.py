"""NeuronRank: score weights by what their neuron's activations look like over the calibration text.

For channel j of a signal a (per token t of calibration window d):

    TF_j         = mean over all tokens of |a_j|
    spikiness_j  = max_t |a_j| / TF_j
    doc mode     m[d, j] = mean_t |a[d, t, j]|, one row per calibration window
    topic mode   m[k, j] = mean |a_j| over the tokens of topic k (cosine k-means on a fixed random
                 projection of the tokens' activations); N counts the non-empty topics
    DF_j         = #{rows r : m[r, j] > tau},  tau = the q_active quantile of all of m
    IDF_j        = log((N + 1) / (DF_j + 1)) + 1
    old (token)  DF_j = #{tokens : a_j > 0}, N = number of tokens, same IDF

    score[i, j]  = |W[i, j]|^alpha * TF_j^beta * IDF_j^gamma * spikiness_j^rho

broadcast along the neuron's axis of each matrix (rows of gate/up/q/k/v, columns of down/o);
neuronrank_old uses the L2 norm of the neuron's weights instead of |W[i, j]|. tau is one threshold
for the whole module, so channels differ in DF; a per-channel threshold (as in the public code
these methods come from) makes every channel "active" everywhere and IDF a constant. This is the
seeds' definition, `--nr-score neuron`, with one threshold over each matrix's scores.

`--nr-score input` (the default of neuronrank_tfidf) puts the statistics on each matrix's input
channels instead, and compares weights within each output row as Wanda does:

    score[i, j]  = |W[i, j]| * ||X_j||_2 * IDF_j^gamma          (Wanda at gamma = 0; --nr-input-idf-exp)

with IDF from the same doc/topic statistics of the matrix's input X. The neuron score multiplies
a whole row of gate/up by one factor, and one threshold per module then removes near-whole neurons;
within a row that factor cancels, and only the input channel's rarity is left to add.
"""
from __future__ import annotations

import math

import torch

from ..config import PruneConfig
from ..model.matrices import Matrix
from ..runtime.masks import ScoreRows, chunks_of, zero_lowest
from ..surgery.neurons import InputMoments, MlpUnit, neuron_norms
from .base import PruningMethod

PROJECTION_DIM = 128
KMEANS_ITERATIONS = 4


def inverse_frequency(df: torch.Tensor, n: int) -> torch.Tensor:
    return torch.log((n + 1) / (df.double() + 1)) + 1


def frequency_above_quantile(strengths: torch.Tensor, q_active: float) -> torch.Tensor:
    """DF per channel: rows of `strengths` [rows, channels] above the module-wide quantile."""
    tau = torch.quantile(strengths.double().flatten(), q_active)
    return (strengths.double() > tau).sum(dim=0)


def cosine_kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Topic label per row of `points` (unit vectors). A topic that loses all its tokens keeps its
    centroid and stays empty; it is not counted as a document."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, points.shape[0])
    centroids = points[torch.randperm(points.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        labels = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        filled = sums.norm(dim=1) > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return (points @ centroids.T).argmax(dim=1)


class ChannelStatistics:
    """Streaming statistics of one signal [windows, tokens, channels]; topic mode takes two passes."""

    def __init__(self, mode: str, config: PruneConfig):
        self.mode, self.config = mode, config
        self.abs_sum = self.abs_max = self.positive = self.squares = None
        self.tokens = 0
        self.rows: list[torch.Tensor] = []            # doc: per-window means; topic pass 0: projections
        self.labels: torch.Tensor | None = None       # topic: label per token, after pass 0
        self.topic_sums = self.topic_counts = None
        self.projection: torch.Tensor | None = None
        self.cursor = 0

    def add(self, activations: torch.Tensor, calibration_pass: int) -> None:
        a = activations.detach().reshape(-1, activations.shape[-2], activations.shape[-1]).float()
        flat = a.reshape(-1, a.shape[-1]).abs()
        if calibration_pass == 1:  # topic mode: per-topic sums with the labels found after pass 0
            labels = self.labels[self.cursor:self.cursor + flat.shape[0]].to(flat.device)
            self.cursor += flat.shape[0]
            self.topic_sums.index_add_(0, labels, flat)
            self.topic_counts += torch.bincount(labels, minlength=len(self.topic_counts)).to(self.topic_counts)
            return
        batch_sum, batch_max = flat.sum(dim=0), flat.max(dim=0).values
        squares = flat.double().pow(2).sum(dim=0) if flat.device.type == "cpu" else flat.pow(2).sum(dim=0)
        if self.abs_sum is None:
            self.abs_sum, self.abs_max, self.squares = batch_sum, batch_max, squares
            self.positive = torch.zeros_like(batch_sum)
        else:
            self.abs_sum += batch_sum
            self.abs_max = torch.maximum(self.abs_max, batch_max)
            self.squares += squares
        self.tokens += flat.shape[0]
        if self.mode == "old":
            self.positive += (a > 0).reshape(-1, a.shape[-1]).sum(dim=0)
        elif self.mode == "doc":
            self.rows.append(a.abs().mean(dim=1).cpu())
        else:
            self.rows.append(torch.nn.functional.normalize(a.reshape(-1, a.shape[-1]) @ self._projection(a), dim=1).cpu())

    def _projection(self, a: torch.Tensor) -> torch.Tensor:
        if self.projection is None:  # fixed: seeded, made once
            generator = torch.Generator().manual_seed(self.config.seed)
            self.projection = (torch.randn(a.shape[-1], PROJECTION_DIM, generator=generator)
                               / math.sqrt(PROJECTION_DIM)).to(a.device)
        return self.projection

    def end_pass(self, calibration_pass: int) -> None:
        if self.mode == "topic" and calibration_pass == 0:
            points = torch.cat(self.rows)
            self.labels = cosine_kmeans(points, self.config.nr_tfidf_k, self.config.seed)
            self.rows = []
            k = min(self.config.nr_tfidf_k, len(points))
            self.topic_sums = torch.zeros(k, self.abs_sum.shape[0], device=self.abs_sum.device)
            self.topic_counts = torch.zeros(k, device=self.abs_sum.device)

    # The factors are computed once per module, in float64 on the CPU (no float64 on a GPU).
    def tf(self) -> torch.Tensor:
        return self.abs_sum.cpu().double() / self.tokens

    def spikiness(self) -> torch.Tensor:
        tf = self.tf()
        return torch.where(tf > 0, self.abs_max.cpu().double() / tf, torch.ones_like(tf))

    def idf(self) -> torch.Tensor:
        if self.mode == "old":
            return inverse_frequency(self.positive.cpu(), self.tokens)
        if self.mode == "doc":
            return inverse_frequency(frequency_above_quantile(torch.cat(self.rows), self.config.nr_q_active), sum(len(r) for r in self.rows))
        filled = (self.topic_counts > 0).cpu()
        strengths = self.topic_sums.cpu()[filled] / self.topic_counts.cpu()[filled, None]
        return inverse_frequency(frequency_above_quantile(strengths, self.config.nr_q_active), int(filled.sum()))

    def neuron_factor(self) -> torch.Tensor:
        """float32, on the device the statistics were gathered on."""
        c = self.config
        factor = self.tf() ** c.tf_exp * self.idf() ** c.idf_exp * self.spikiness() ** c.nr_spikiness_exp
        return factor.float().to(self.abs_sum.device)

    def input_factor(self) -> torch.Tensor:
        """||X_j||_2 * IDF_j^gamma per input channel (--nr-score input; gamma = --nr-input-idf-exp)."""
        factor = self.squares.cpu().double().sqrt() * self.idf() ** self.config.nr_input_idf_exp
        return factor.float().to(self.abs_sum.device)


def unit_output(matrices: dict[str, Matrix], matrix: Matrix) -> Matrix | None:
    """The matrix that writes the output of an MLP unit (down_proj, fc2, c_proj), if the unit has one."""
    if matrix.kind != "mlp":
        return None
    return next((m for m in matrices.values() if m.unit == matrix.unit and m.position == "out"), None)


def signal_of(matrices: dict[str, Matrix], name: str, mlp_signal: str) -> tuple[str, str, int]:
    """(signal key, 'inputs' or 'outputs' of this matrix that carry it, axis of W along the channel).
    An MLP unit has one signal, its neurons: the input of the matrix writing its output (down_input),
    or the output of its first matrix (gate). Attention matrices each have their own."""
    matrix = matrices[name]
    output = unit_output(matrices, matrix)
    if output is None:
        return name, ("inputs" if matrix.position == "out" else "outputs"), 1 if matrix.position == "out" else 0
    if matrix is output:
        return matrix.unit, "inputs" if mlp_signal == "down_input" else "", 1
    first = min((m for m in matrices.values() if m.unit == matrix.unit and m.position == "in"), key=lambda m: m.stage)
    return matrix.unit, "outputs" if mlp_signal == "gate" and matrix is first else "", 0


def neuron_rows(values: torch.Tensor, rows: int, interleaved: bool) -> torch.Tensor:
    """Per-neuron values spread over the rows of a matrix whose rows may fuse several projections
    (gate_up_proj: k = 2 rows per neuron, [gate..., up...] or interleaved [gate0, up0, ...])."""
    k = rows // values.shape[0]
    return values.repeat_interleave(k) if interleaved else values.repeat(k)


def gate_part(outputs: torch.Tensor, neurons: int, interleaved: bool) -> torch.Tensor:
    """The gate projection's channels of a fused gate_up output."""
    k = outputs.shape[-1] // neurons
    return outputs[..., ::k] if interleaved else outputs[..., :neurons]


class NeuronRank(PruningMethod):
    """neuronrank_tfidf (doc / topic) and neuronrank_old."""

    # TF and DF describe how often and how strongly a neuron fires, not an output error: an expert's
    # tokens count once each, whatever weight the router gives them.
    weights_by_router = False

    options = ("nr_tfidf_mode", "nr_tfidf_k", "nr_q_active", "nr_spikiness_exp", "weight_exp", "tf_exp",
               "idf_exp", "nr_mlp_signal", "nr_score", "nr_input_idf_exp")

    def __init__(self, config: PruneConfig, variant: str | None = None):
        super().__init__(config)
        self.variant = variant or config.prune_method
        self.mode = "old" if self.variant == "neuronrank_old" else config.nr_tfidf_mode
        # Whole neurons (structured) are scored by their neuron signal, whatever --nr-score says.
        self.by_input = self.mode != "old" and config.nr_score == "input" and config.sparsity_type != "structured"
        self.calibration_passes = 2 if self.mode == "topic" else 1
        self.signals: dict[str, ChannelStatistics] = {}
        self.calibration_pass = 0
        self.matrices: dict[str, Matrix] = {}

    def groups(self, linears: dict[str, Matrix]) -> list[list[str]]:
        self.matrices = linears
        return [list(linears)]

    def _signal(self, name: str) -> tuple[str, str, int]:
        return (name, "inputs", 1) if self.by_input else signal_of(self.matrices, name, self.config.nr_mlp_signal)

    def discard(self, names: list[str]) -> None:
        for name in names:
            self.signals.pop(self._signal(name)[0], None)

    def rule(self, name: str) -> str:
        if self.mode == "old":
            return "neuronrank_old"
        return f"neuronrank_tfidf({self.mode}{', input' if self.by_input else ''})"

    def start_pass(self, index: int) -> None:
        if index > 0:
            for stats in self.signals.values():
                stats.end_pass(index - 1)
        self.calibration_pass = index

    def add_batch(self, name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        key, side, _ = self._signal(name)
        if side:
            signal = inputs if side == "inputs" else outputs
            output = unit_output(self.matrices, self.matrices[name])
            if side == "outputs" and output is not None:  # an MLP's gate: its neurons only
                signal = gate_part(signal, output.in_features, self.matrices[name].interleaved)
            stats = self.signals.setdefault(key, ChannelStatistics(self.mode, self.config))
            stats.add(signal if signal.dim() > 2 else signal[None], self.calibration_pass)

    def statistics_bytes(self, linears) -> int:
        """Per signal: float32 channel sums, maxima and counts; doc mode one row per window; topic mode
        one 128-dim projection per token, then one row per topic."""
        c = self.config
        sides = {n: "inputs" if self.by_input else signal_of(linears, n, c.nr_mlp_signal)[1] for n in linears}
        channels = [m.out_features if sides[n] == "outputs" else m.in_features for n, m in linears.items() if sides[n]]
        rows = {"old": 0, "doc": c.nsamples, "topic": c.nsamples * c.seqlen * PROJECTION_DIM // max(channels or [1])}
        return sum(ch * 4 * (3 + rows[self.mode]) for ch in channels)

    @torch.no_grad()
    def prune(self, linears: dict[str, Matrix], sparsity: float) -> dict[str, dict]:
        if self.by_input:
            factors = {key: stats.input_factor() for key, stats in self.signals.items()}
            self.signals = {}
            for name, linear in linears.items():
                factor = factors[name]
                zero_lowest(linear.weight, lambda rows, w=linear.weight, f=factor: w[rows].float().abs().mul_(f),
                            sparsity, self.config.nm, per_row=True)
            return {name: {"rule": self.rule(name)} for name in linears}
        factors = {key: stats.neuron_factor() for key, stats in self.signals.items()}
        self.signals = {}
        for name, linear in linears.items():
            key, _, axis = signal_of(self.matrices, name, self.config.nr_mlp_signal)
            factor = factors[key].float()
            if axis == 0 and factor.numel() != linear.out_features:
                factor = neuron_rows(factor, linear.out_features, linear.interleaved)
            zero_lowest(linear.weight, self._scorer(linear.weight, factor, axis),
                        sparsity, self.config.nm, per_row=False)
        return {name: {"rule": self.rule(name)} for name in linears}

    def _scorer(self, weight: torch.Tensor, factor: torch.Tensor, axis: int) -> ScoreRows:
        """Scores of a slice of rows: the weight's magnitude (old: its neuron's L2 norm, the same for
        all of the neuron's weights) times the neuron factor, along the neuron's axis."""
        alpha = self.config.weight_exp
        column_norms = None
        if self.mode == "old" and axis == 1:  # neurons are columns: their norms span every row
            chunks = chunks_of(weight)
            squares = sum(weight[rows].float().pow(2).sum(dim=0) for rows in chunks)
            column_norms = squares.sqrt()

        def score_rows(rows: slice) -> torch.Tensor:
            w = weight[rows].float()
            if self.mode != "old":
                magnitude = w.abs()
            elif axis == 0:
                magnitude = w.norm(dim=1, keepdim=True).expand_as(w)
            else:
                magnitude = column_norms[None, :].expand_as(w)
            neuron = factor[rows, None] if axis == 0 else factor[None, :]
            return magnitude.pow(alpha).mul_(neuron)

        return score_rows

    def neuron_scores(self, unit: MlpUnit, moments: InputMoments | None) -> torch.Tensor:
        """Structured: the neuron's L2 norm over its rows and its column, to the weight exponent, times
        its TF-IDF factor (neuronrank_old: TF only) from the unit's neuron signal."""
        key = signal_of(self.matrices, unit.output.name, self.config.nr_mlp_signal)[0]
        factor = self.signals.pop(key).neuron_factor().double()
        norms = neuron_norms(unit)
        return norms ** self.config.weight_exp * factor.to(norms.device)
