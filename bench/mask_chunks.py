"""Mask selection on the CPU: time and page faults of Wanda's per-row selection by chunk size.

The stream keeps allocations of 1 MiB and more mmapped (hostmem), so a temporary that large is a fresh
mapping whose pages fault in again; the CPU chunk (masks.HOST_CHUNK_ELEMENTS) keeps every temporary of
the selection below that. This times both chunk sizes on the matrices of bench/memory.py's block.

    python bench/mask_chunks.py                 # torch's default threads
    python bench/mask_chunks.py --threads 1
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from offload_prune.runtime import masks
from offload_prune.runtime.hostmem import keep_large_allocations_mmapped
from memory import WIDTH, machine


def select_all(weights: list[torch.Tensor], norms: list[torch.Tensor], repeats: int) -> tuple[float, int]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(repeats):
        for weight, norm in zip(weights, norms):
            masks.zero_lowest(weight.clone(), lambda rows, w=weight, n=norm: w[rows].abs().mul_(n), 0.5, None, True)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_large_allocations_mmapped()
    torch.manual_seed(0)
    h, i = WIDTH["hidden_size"], WIDTH["intermediate_size"]
    kv = h * WIDTH["num_key_value_heads"] // WIDTH["num_attention_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q, k, v, o, gate, up, down
    weights = [torch.randn(shape) for shape in shapes]
    norms = [torch.rand(shape[1]) for shape in shapes]
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads")
    print(f"per-row 50 % selection over one block's 7 matrices ({sum(w.numel() for w in weights) / 1e6:.0f}M "
          f"weights), {args.repeats} times")
    for label, elements in (("GPU chunk", masks.CHUNK_ELEMENTS), ("CPU chunk", masks.HOST_CHUNK_ELEMENTS)):
        masks.HOST_CHUNK_ELEMENTS = elements
        select_all(weights, norms, 1)  # warm-up
        seconds, faults = select_all(weights, norms, args.repeats)
        print(f"{label} ({elements} scores): {seconds:.2f} s, {faults} minor page faults")


if __name__ == "__main__":
    main()
