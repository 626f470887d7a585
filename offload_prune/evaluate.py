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

from .activations import ActivationStore
from .calibration import eval_windows, load_text, tokenize
from .checkpoint import CheckpointReader
from .hostmem import keep_large_allocations_mmapped
from .skeleton import StreamedModel, run_windows


@torch.no_grad()
def perplexity(reader: CheckpointReader, token_ids: torch.Tensor, seqlen: int, max_windows: int | None,
               device: torch.device, dtype: torch.dtype, micro_batch_size: int = 1,
               on_disk: bool = False, quiet: bool = False, label: str = "eval") -> dict:
    keep_large_allocations_mmapped()
    start = time.perf_counter()
    windows = eval_windows(token_ids, seqlen, max_windows)
    streamed = StreamedModel(reader, device, dtype)
    with tempfile.TemporaryDirectory(prefix="offload-prune-eval-") as tmp:
        store = ActivationStore(Path(tmp), (len(windows), seqlen, reader.config.hidden_size), dtype, on_disk)
        hidden = store.create(0)
        streamed.load_outside(with_head=False)
        layer_kwargs = streamed.capture_into(windows, hidden, quiet, f"{label}: embed")
        streamed.unload_outside()
        for index in tqdm(range(streamed.num_layers), desc=f"{label}: blocks", disable=quiet, leave=False):
            block = streamed.load_block(index)
            run_windows(block, layer_kwargs[index], hidden, hidden, micro_batch_size, device)
            streamed.unload_block(index)
        streamed.load_outside(with_head=True)
        nlls = []
        for i in tqdm(range(len(windows)), desc=f"{label}: logits", disable=quiet, leave=False):
            logits = streamed.logits(hidden[i:i + 1], windows[i:i + 1]).float()
            targets = windows[i:i + 1, 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0])
            nlls.append(loss.item() * seqlen)
    return {"ppl": math.exp(sum(nlls) / (len(windows) * seqlen)), "windows": len(windows),
            "seqlen": seqlen, "seconds": time.perf_counter() - start}


def evaluate_text(reader: CheckpointReader, eval_data: str, seqlen: int, max_windows: int | None,
                  device: torch.device, dtype: torch.dtype, tokenizer, **options) -> dict:
    token_ids = tokenize(tokenizer, load_text(eval_data, split="test"))
    return perplexity(reader, token_ids, seqlen, max_windows, device, dtype, **options)
