"""Perplexity streamed block by block, so a model evaluates within the memory it was pruned in.

Computed as SparseGPT and Wanda do: the text tokenised once, cut into non-overlapping windows
of `seqlen` tokens, mean next-token NLL per window, ppl = exp(sum(nll_w * seqlen) / (W * seqlen)).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.calibration import eval_windows, load_text, tokenize
from ..disk.checkpoint import CheckpointReader
from ..model.expert_groups import grouped_blocks, streamed_forward
from ..model.skeleton import StreamedModel, run_windows
from ..plan.memory import logits_chunk_positions
from ..runtime.activations import ActivationStore
from ..runtime.hostmem import keep_large_allocations_mmapped


@torch.no_grad()
def perplexity(reader: CheckpointReader, windows: torch.Tensor, device: torch.device, dtype: torch.dtype,
               micro_batch_size: int = 1, on_disk: bool = False, quiet: bool = False, label: str = "eval",
               expert_group_size: int | None = None) -> dict:
    """`expert_group_size`: Mixture-of-Experts blocks run with their routed experts read that many at a time
    (model/expert_groups.py), for blocks larger than the device; the same result as whole blocks."""
    keep_large_allocations_mmapped()
    start = time.perf_counter()
    seqlen = windows.shape[1]
    streamed = StreamedModel(reader, device, dtype)
    grouped = grouped_blocks(streamed, expert_group_size)
    with tempfile.TemporaryDirectory(prefix="offload-prune-eval-") as tmp:
        store = ActivationStore(Path(tmp), (len(windows), seqlen, reader.config.hidden_size), dtype,
                                "disk" if on_disk else "ram", device)  # page-locked when a GPU computes
        hidden = store.create(0)
        streamed.load_outside(with_head=False)
        layer_kwargs = streamed.capture_into(windows, hidden, quiet, f"{label}: embed")
        streamed.unload_outside()
        for index in tqdm(range(streamed.num_layers), desc=f"{label}: blocks", disable=quiet, leave=False):
            block = streamed.load_block(index)
            with streamed_forward(grouped, streamed, index):
                run_windows(block, layer_kwargs[index], hidden, hidden, micro_batch_size, device)
            streamed.unload_block(index)
        streamed.load_outside(with_head=True)
        chunk = logits_chunk_positions(reader.config.vocab_size)
        nlls = []
        for i in tqdm(range(len(windows)), desc=f"{label}: logits", disable=quiet, leave=False):
            mean_nll = streamed.next_token_nll(hidden[i:i + 1], windows[i:i + 1], chunk) / (seqlen - 1)
            nlls.append(mean_nll * seqlen)  # as the reference scripts weigh each window
        del hidden
        store.release()
    return {"ppl": math.exp(sum(nlls) / (len(windows) * seqlen)), "windows": len(windows),
            "seqlen": seqlen, "seconds": time.perf_counter() - start}


def evaluation_windows(eval_data: str, tokenizer, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The evaluation text (its test or validation split for a named dataset), tokenized once."""
    return eval_windows(tokenize(tokenizer, load_text(eval_data, split="test")), seqlen, max_windows)
