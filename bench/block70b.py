"""SparseGPT on ONE decoder block with LLaMA-2-70B shapes, and the plan for the whole 70B model.

1. A one-layer fp16 checkpoint with LLaMA-2-70B shapes (hidden 8192, intermediate 28672, 64 heads,
   8 KV heads) is pruned by the real pipeline in a fresh process: peak RSS and time per linear.
2. Statistics accumulation on that block with shared Hessians (one per distinct input) against
   one Hessian per linear: time ratio.
3. What `offload-prune plan` predicts for the full model on a 24 GB GPU.

    python bench/block70b.py                 # CPU: ~20 min on 2 cores, ~12 GiB of RAM
    python bench/block70b.py --device cuda   # on a GPU: also torch.cuda.max_memory_allocated
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from memory import machine
from phases import phase_table
from phases import run as run_offload_prune
from synthetic import build_checkpoint

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False)
GIB = 2**30


def prune_block(model: Path, save: Path, args) -> dict:
    return run_offload_prune(
        ["--model", str(model), "--prune_method", "sparsegpt", "--calib-data", str(model / "demo.txt"),
         "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device,
         # every phase, for the plan-vs-measured table: the head pruned, and a short evaluation
         "--nr-prune-lm-head", "--eval-ppl", "--eval-data", str(model / "demo.txt"), "--eval-max-windows", "2"],
        save)


@torch.no_grad()
def statistics_time(model: Path, args, share: bool) -> dict[str, float]:
    """Seconds per linear spent accumulating statistics (SparseGPT's add_batch) during one calibration
    pass through the block, Hessians shared or not; the block's own forward is left out (the same)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from offload_prune.disk.checkpoint import CheckpointReader
    from offload_prune.config import PruneConfig
    from offload_prune.methods.sparsegpt import SparseGPT
    from offload_prune.model.matrices import describe, find_matrices
    from offload_prune.stream.passes import collect
    from offload_prune.model.skeleton import StreamedModel

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    reader = CheckpointReader(str(model))
    streamed = StreamedModel(reader, device, dtype)
    block = streamed.load_block(0)
    options = PruneConfig(micro_batch_size=1, model=str(model), prune_method="sparsegpt", seqlen=args.seqlen).validate()
    method = SparseGPT(options, share_hessians=share)
    x = torch.randn(args.nsamples, args.seqlen, LLAMA2_70B["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dtype)
    positions = torch.arange(args.seqlen, device=device)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(reader.config).to(device)(x.to(device), positions),
              "position_ids": positions, "attention_mask": None}
    spent: dict[str, float] = {}
    add_batch = method.add_batch

    def timed(name, *a):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        add_batch(name, *a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    method.add_batch = timed
    matrices = find_matrices(block)
    describe(block, matrices)
    collect(method, block, matrices, kwargs, x, options, device)
    return spent


def compare_hessian_sharing(model: Path, args) -> None:
    runs = {True: [], False: []}
    for share in (True, False, True, False):  # alternate, keep the best of two each
        runs[share].append(statistics_time(model, args, share))
    sharing = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for title, names in (("q/k/v and gate/up (where inputs are shared)", sharing), ("all seven linears", None)):
        shared, per_linear = (min(sum(t for n, t in run.items() if names is None or n.endswith(names))
                                  for run in runs[share]) for share in (True, False))
        print(f"\nHessian accumulation, {title}: shared {shared:.2f} s, one per linear {per_linear:.2f} s, "
              f"ratio {per_linear / shared:.2f}x", end="")
    print("\n(and pruning factorises 4 Hessians per block instead of 7)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "offload-prune-bench")
    parser.add_argument("--stats-only", action="store_true", help="skip the pruning run")
    parser.add_argument("--no-stats", action="store_true", help="skip the Hessian accumulation timing")
    args = parser.parse_args()

    model = args.workdir / "llama2-70b-one-block"
    if not (model / "config.json").exists():
        build_checkpoint(model, LlamaConfig(num_hidden_layers=1, bos_token_id=256, eos_token_id=257,
                                            dtype="float16", **LLAMA2_70B))
    print(f"machine: {machine()}")
    print(f"one LLaMA-2-70B block (fp16 checkpoint), SparseGPT 50% unstructured, {args.nsamples} x {args.seqlen} "
          f"calibration tokens, device {args.device}\n")

    if not args.stats_only:
        report = prune_block(model, args.workdir / "llama2-70b-one-block-pruned", args)
        print("| linear | shape | seconds | reconstruction error |")
        print("|---|---|---|---|")
        for name, module in report["modules"].items():
            if "seconds" not in module:  # the head, pruned by magnitude for the phase table
                continue
            print(f"| {name.split('layers.0.')[1]} | {module['shape'][0]} x {module['shape'][1]} | "
                  f"{module['seconds']:.1f} | {module['reconstruction_error']:.4f} |")
        plan = report["memory_plan"]
        print(f"\npeak host RSS {report['peak_host_rss_bytes'] / GIB:.2f} GiB (plan: {plan['host']['peak'] / GIB:.2f} GiB)"
              + (f", peak CUDA memory {report['peak_device_bytes'] / GIB:.2f} GiB reserved "
                 f"(plan: {plan['device']['peak'] / GIB:.2f} GiB)" if report["peak_device_bytes"] else ""))
        print("\nplan against measured peaks, by phase:\n" + phase_table(report))
        print(f"phases: {', '.join(f'{k} {v:.0f} s' for k, v in report['seconds'].items())}; "
              f"wall {report['wall_seconds']:.0f} s")

    if not args.no_stats:
        compare_hessian_sharing(model, args)

    from offload_prune.config import PruneConfig
    from offload_prune.plan.memory import format_plan, memory_plan
    full = LlamaConfig(num_hidden_layers=80, dtype="float16", **LLAMA2_70B)
    print("\nplan for the full LLaMA-2-70B (128 x 2048 calibration tokens) on a GPU:")
    for offload in ("ram", "disk"):
        plan = memory_plan(PruneConfig(micro_batch_size=1, model="llama2-70b", prune_method="sparsegpt", offload_activations=offload).validate(),
                           full, "cuda", calibration_text_bytes=0, eval_windows=0)
        print(f"  activations in {offload}:")
        print("  " + format_plan(plan, "meta-llama/Llama-2-70b-hf").replace("\n", "\n  "))


if __name__ == "__main__":
    main()
