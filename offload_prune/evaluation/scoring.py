"""Log-likelihoods of continuations, streamed: every window goes through block 0, then block 1, ... so
each block is read once for all requests, and only the scored positions go through the head.

Crash-safe as a prune is: the windows' hidden states after each block are committed in a run folder
(disk/runstate.py, its manifest and its lock), and a killed evaluation resumes from the last committed
block. The folder is named by what the scores depend on (the checkpoint's files, the requests, device,
dtype, micro-batch), so the same command finds it again; once the scores are written it holds only
them, until the caller drops it.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .. import __version__
from ..disk import durable
from ..disk.checkpoint import CheckpointReader
from ..disk.runstate import RunState
from ..model.expert_groups import GroupedBlock, grouped_blocks, streamed_forward
from ..model.skeleton import StreamedModel, run_windows
from ..plan.memory import logits_chunk_positions
from ..runtime.activations import ActivationStore
from ..runtime.hostmem import keep_large_allocations_mmapped
from .requests import Packed, Request

SCORES_NAME = "scores.json"


def fingerprint(reader: CheckpointReader, packed: Packed, device: torch.device, dtype: torch.dtype,
                micro_batch_size: int) -> dict:
    """What the scores depend on. Unlike a prune's, the checkpoint's folder and its files' times are part of
    it: a model pruned again into the same folder has the same headers and sizes, not the same weights."""
    files = sorted(reader.folder / shard for shard in reader.shard_files())
    return {"checkpoint": reader.identity(), "folder": str(reader.folder.resolve()),
            "modified_ns": [path.stat().st_mtime_ns for path in files], "requests_sha256": packed.digest(),
            "device": device.type, "dtype": str(dtype).replace("torch.", ""), "micro_batch_size": micro_batch_size,
            "versions": {"offload_prune": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def state_folder(work: Path, job: dict) -> Path:
    return work / hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def score(reader: CheckpointReader, packed: Packed, device: torch.device, dtype: torch.dtype, where: str,
          micro_batch_size: int, work: Path, quiet: bool = False, label: str = "eval",
          expert_group_size: int | None = None) -> tuple[list[tuple[float, bool]], Path]:
    """(sum of the continuation's log-probabilities, whether each of its tokens is the greedy one) per request,
    and the folder that holds them (and, until they were written, the resumable state). `expert_group_size`:
    Mixture-of-Experts blocks run with their routed experts that many at a time (the same scores)."""
    keep_large_allocations_mmapped()
    job = fingerprint(reader, packed, device, dtype, micro_batch_size)
    # No read-ahead, as for perplexity: the eval phase of the plan holds one block (all requests go through it:
    # reading the next block is short beside that compute).
    streamed = StreamedModel(reader, device, dtype)
    grouped = grouped_blocks(streamed, expert_group_size)
    state = RunState.prepare(state_folder(work, job), reader.folder, job, streamed.num_layers, overwrite=False,
                             resume=False, what="the evaluation folder")
    try:
        if not state.manifest["finished"]:
            _run_blocks(streamed, grouped, state, packed, where, micro_batch_size, quiet, label)
        scores = json.loads((state.save / SCORES_NAME).read_text())
        return [(value, greedy) for value, greedy in scores], state.save
    finally:
        streamed.close()
        state.release()


def _run_blocks(streamed: StreamedModel, grouped: dict[int, GroupedBlock], state: RunState, packed: Packed,
                where: str, micro_batch_size: int, quiet: bool, label: str) -> None:
    hidden = streamed.reader.config.hidden_size
    stores = [ActivationStore(state.dir, (len(b.lengths), b.length, hidden), streamed.dtype, where, streamed.device,
                              tag=f".bucket{i}") for i, b in enumerate(packed.buckets)]
    done = state.completed_blocks if state.manifest["captured"] else None
    if done and not quiet:
        print(f"{label}: resuming, {done} of {streamed.num_layers} blocks already done", file=sys.stderr)
    streamed.load_outside(with_head=False)
    kwargs = [_layer_kwargs(streamed, bucket.tokens, store, done is None)
              for bucket, store in tqdm(list(zip(packed.buckets, stores)), desc=f"{label}: embed", disable=quiet,
                                        leave=False)]
    streamed.unload_outside()
    if done is None:
        state.commit(run_files={store.name(0): store.commit(0) for store in stores}, captured=True)
        done = 0
    else:
        for store in stores:
            store.open(done)
    calls = [max(1, micro_batch_size * packed.longest // bucket.length) for bucket in packed.buckets]
    for index in tqdm(range(done, streamed.num_layers), desc=f"{label}: blocks", disable=quiet, leave=False,
                      initial=done, total=streamed.num_layers):
        block = streamed.load_block(index)
        for store, layer_kwargs, windows_per_call in zip(stores, kwargs, calls):
            outputs = store.output_buffer(index + 1)
            with streamed_forward(grouped, streamed, index):
                run_windows(block, layer_kwargs[index], store.tensor, outputs, windows_per_call, streamed.device,
                            written=store.written)
        streamed.unload_block(index)
        records = {store.name(index + 1): store.commit(index + 1) for store in stores}
        state.commit(run_files=records, completed_blocks=index + 1)
    scores = _head_scores(streamed, packed, [store.tensor for store in stores], quiet, label)
    record = durable.write_text(state.save / SCORES_NAME, json.dumps(scores))
    state.commit(outputs={SCORES_NAME: record}, stage=0, run_files={}, finished=True)
    for store in stores:
        store.release()


def _layer_kwargs(streamed: StreamedModel, tokens: torch.Tensor, store: ActivationStore, capture: bool) -> list[dict]:
    """Each layer's keyword arguments for windows of this length; with `capture`, the layer-0 inputs of
    every window too (on resume they come from the committed files, so one window is embedded for the
    arguments alone)."""
    if capture:
        return streamed.capture_into(tokens, store.create(0), True, "", written=store.written)
    scratch = torch.empty((1, *store.shape[1:]), dtype=store.dtype)
    return streamed.capture_into(tokens[:1], scratch, True, "")


def _head_scores(streamed: StreamedModel, packed: Packed, finals: list[torch.Tensor], quiet: bool,
                 label: str) -> list[tuple[float, bool]]:
    by_window: dict[tuple[int, int], list[int]] = {}
    for number, request in enumerate(packed.requests):
        by_window.setdefault((request.bucket, request.row), []).append(number)
    scores: list[tuple[float, bool]] = [(0.0, True)] * len(packed.requests)
    streamed.load_outside(with_head=True)
    chunk = logits_chunk_positions(streamed.reader.config.vocab_size)
    for (bucket, row), numbers in tqdm(sorted(by_window.items()), desc=f"{label}: scores", disable=quiet,
                                       leave=False):
        length = packed.buckets[bucket].lengths[row]
        ids = packed.buckets[bucket].tokens[row:row + 1, :length]
        requests = [packed.requests[n] for n in numbers]
        first = min(r.start for r in requests)
        sums = {n: 0.0 for n in numbers}
        greedy = {n: True for n in numbers}
        for positions, logits in streamed.head_logits(finals[bucket][row:row + 1, :length], ids,
                                                      torch.arange(first, length), chunk):
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            best = log_probs.argmax(dim=-1)
            low, high = int(positions[0]), int(positions[-1]) + 1
            for number, request in zip(numbers, requests):
                picked = _overlap(request, low, high)
                if picked is None:
                    continue
                rows, targets = (t.to(log_probs.device) for t in picked)
                sums[number] += float(log_probs[rows, targets].sum())
                greedy[number] &= bool((best[rows] == targets).all())
        for number in numbers:
            scores[number] = (sums[number], greedy[number])
    streamed.unload_outside()
    return scores


def _overlap(request: Request, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The request's scored positions within [low, high): their rows in the chunk and their target tokens."""
    start, end = max(request.start, low), min(request.start + len(request.targets), high)
    if start >= end:
        return None
    targets = torch.tensor(request.targets[start - request.start:end - request.start], dtype=torch.long)
    return torch.arange(start - low, end - low), targets
