"""Scoring requests (a context and a continuation, as token ids) packed into windows for the stream.

Each request is cut as lm-eval's HFLM cuts it: the model reads (context + continuation) left-truncated to
`max_length + 1` tokens, without its last token, and the continuation is scored at the last
len(continuation) positions. Requests that read the same tokens (the choices of a one-token multiple
choice) share one window. Windows are grouped by length into buckets, each padded on the right to the
bucket's length: a causal model's positions never see the padding after them, so the scores are those
of the unpadded window.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..config import OffloadPruneError


@dataclass(frozen=True)
class Request:
    """Where one request is scored: window `row` of `bucket`, positions start.. start+len(targets)-1 predicting
    `targets`."""
    bucket: int
    row: int
    start: int
    targets: tuple[int, ...]


@dataclass
class Bucket:
    """Windows of the same padded length: `tokens` (windows x length), and each window's real length."""
    tokens: torch.Tensor
    lengths: list[int]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@dataclass
class Packed:
    buckets: list[Bucket]
    requests: list[Request]

    @property
    def windows(self) -> int:
        return sum(len(b.lengths) for b in self.buckets)

    @property
    def padded_tokens(self) -> int:
        return sum(b.tokens.numel() for b in self.buckets)

    @property
    def longest(self) -> int:
        return max((b.length for b in self.buckets), default=0)

    def digest(self) -> str:
        """Identifies the work by content: the windows and what each request scores."""
        sha = hashlib.sha256()
        for bucket in self.buckets:
            sha.update(bucket.tokens.numpy().tobytes())
        sha.update(repr([(r.bucket, r.row, r.start, r.targets) for r in self.requests]).encode())
        return sha.hexdigest()


def padded_length(length: int) -> int:
    """Lengths rounded up to 1/16 of their power of two (at least 8): under 1/16 of padding, and few buckets."""
    granule = max(8, 1 << max(0, length.bit_length() - 5))
    return -(-length // granule) * granule


def pack(pairs: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> Packed:
    """Windows and scoring positions for (context tokens, continuation tokens) pairs, in their order."""
    windows: dict[tuple[int, ...], int] = {}
    placed: list[tuple[int, int, tuple[int, ...]]] = []  # (window, start, targets) per request
    for context, continuation in pairs:
        if not context or not continuation or len(continuation) > max_length:
            raise OffloadPruneError(f"a request with {len(context)} context and {len(continuation)} continuation "
                                    f"tokens cannot be scored in windows of {max_length} tokens")
        read = tuple((context + continuation)[-(max_length + 1):][:-1])
        window = windows.setdefault(read, len(windows))
        placed.append((window, len(read) - len(continuation), tuple(continuation)))
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for read in windows:
        by_length.setdefault(padded_length(len(read)), []).append(read)
    where: dict[tuple[int, ...], tuple[int, int]] = {}
    buckets = []
    for length in sorted(by_length, reverse=True):  # the longest first: a memory problem shows at once
        reads = by_length[length]
        tokens = torch.full((len(reads), length), pad_id, dtype=torch.long)
        for row, read in enumerate(reads):
            tokens[row, :len(read)] = torch.tensor(read, dtype=torch.long)
            where[read] = (len(buckets), row)
        buckets.append(Bucket(tokens, [len(read) for read in reads]))
    by_window = list(windows)
    requests = [Request(*where[by_window[window]], start, targets) for window, start, targets in placed]
    return Packed(buckets, requests)
