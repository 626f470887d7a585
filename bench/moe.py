"""Mixture-of-Experts against dense: the same pruning work on a synthetic MoE checkpoint and on a
dense checkpoint of the same size, peak host memory and time side by side; and per-expert routed
token counts.

    python bench/moe.py                      # 32 experts x 8 layers (~0.85 GB fp16) vs dense, wanda + sparsegpt
    python bench/moe.py --methods wanda --nsamples 8

Checkpoints are written in the hub's layout (per-expert tensors), built once under --out. Each
run is a fresh `offload-prune` process on the CPU; peaks are the report's VmHWM.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from memory import machine
from phases import run as run_offload_prune
from synthetic import build_checkpoint

GIB = 2**30


def configs(experts: int, layers: int, hidden: int, expert_width: int):
    from transformers import AutoConfig
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=hidden // 16, vocab_size=260, bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    moe = AutoConfig.for_model("qwen3_moe", **common, num_experts=experts, num_experts_per_tok=4,
                               moe_intermediate_size=expert_width, intermediate_size=expert_width, dtype="float16")
    # Dense of the same size: one MLP as wide as all the experts together.
    dense = AutoConfig.for_model("qwen3", **common, intermediate_size=experts * expert_width, dtype="float16")
    return {"moe": moe, "dense": dense}


def run(model: Path, method: str, save: Path, nsamples: int, seqlen: int) -> dict:
    return run_offload_prune(["--model", str(model), "--prune_method", method, "--calib-data", str(model / "demo.txt"),
                              "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu"], save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--checkpoints", nargs="+", default=["moe", "dense"], choices=("moe", "dense"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("out/bench-moe"))
    args = parser.parse_args()
    print(f"machine: {machine()}")
    folders = {}
    for kind, config in configs(args.experts, args.layers, args.hidden, args.expert_width).items():
        if kind not in args.checkpoints:
            continue
        folders[kind] = args.out / kind
        if not (folders[kind] / "config.json").exists():
            build_checkpoint(folders[kind], config)
        size = sum(p.stat().st_size for p in folders[kind].glob("*.safetensors"))
        print(f"{kind}: {size / GIB:.2f} GiB of safetensors in {folders[kind]}")
    print(f"calibration {args.nsamples} x {args.seqlen} tokens, CPU, float32 compute\n")
    print("| checkpoint | method | time | peak host RSS | plan | sparsity (all block weights) | experts by magnitude |")
    print("|---|---|---|---|---|---|---|")
    reports = {}
    for method in args.methods:
        for kind, folder in folders.items():
            report = reports[kind, method] = run(folder, method, args.out / f"{kind}-{method}", args.nsamples,
                                                 args.seqlen)
            fallback = sum(1 for m in report["modules"].values() if m.get("fallback") == "few routed tokens")
            print(f"| {kind} | {method} | {report['wall_seconds']:.0f} s | {report['peak_host_rss_bytes'] / GIB:.2f} GiB"
                  f" | {report['memory_plan']['host']['peak'] / GIB:.2f} GiB | "
                  f"{report['totals']['all']['sparsity']:.2%} | {fallback if kind == 'moe' else '-'} |")
    if "moe" not in args.checkpoints:
        return
    report = reports["moe", args.methods[0]]
    counts = {n: m["routed_tokens"] for n, m in report["modules"].items()
              if ".experts." in n and n.endswith("down_proj") and ".layers.0." in n}
    print(f"\nrouted calibration tokens per expert, block 0 ({args.nsamples * args.seqlen} tokens x top-4):")
    print(", ".join(f"{n.split('.experts.')[1].split('.')[0]}: {c}" for n, c in counts.items()))


if __name__ == "__main__":
    main()
