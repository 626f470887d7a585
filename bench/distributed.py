"""torchrun ranks against one process: the same pruned weights, and what each rank holds.

For each method the preset's model is pruned by one process and by `--ranks` torchrun processes
(gloo on the CPU, NCCL on GPUs), with the same calibration windows. Printed per method: mask
agreement, the largest kept-weight difference relative to its matrix's norm (the issue's bar:
masks >= 99.9 % equal, kept weights within 1e-3), wall times, and rank 0's activation cache and
peak host RSS against one process's.

    python bench/distributed.py                                # SmolLM2-135M, wanda and sparsegpt, 2 ranks
    python bench/distributed.py --preset stories260k --methods wanda sparsegpt admm
    python bench/distributed.py --methods sparsegpt --prune-args="--hessian-dtype float64" --single-threads 1

On a machine with fewer cores than ranks x threads the times say little about speed: the ranks
share the cores one process would use alone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from memory import machine
from quality import PRESETS

REPO = Path(__file__).resolve().parents[1]


def prune_command(preset: dict, save: Path, method: str, ranks: int, extra: list[str]) -> list[str]:
    args = ["-m", "offload_prune", "--model", str(preset["model"]), "--save", str(save), "--prune_method", method,
            "--calib-data", str(preset["calib"]), "--nsamples", str(preset["nsamples"]),
            "--seqlen", str(preset["seqlen"]), "--quiet", *extra]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]


def timed_prune(preset: dict, save: Path, method: str, ranks: int, threads: int, extra: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(prune_command(preset, save, method, ranks, extra), cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{method}, {ranks} ranks failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def block_order(name: str) -> tuple[int, str]:
    found = re.search(r"layers\.(\d+)\.", name)
    return (int(found.group(1)) if found else -1, name)


def compare(one: Path, two: Path) -> dict:
    single, split = tensors(one), tensors(two)
    weights = agree = 0
    worst = 0.0
    first_difference = None
    for name in sorted(single, key=block_order):
        weight, other = single[name], split[name]
        if first_difference is None and not torch.equal(weight, other):
            first_difference = name
        if weight.dim() < 2:
            continue
        weights += weight.numel()
        agree += int(((weight == 0) == (other == 0)).sum())
        kept = (weight != 0) & (other != 0)
        if kept.any():
            worst = max(worst, float((other[kept].float() - weight[kept].float()).norm() / weight[kept].float().norm()))
    return {"mask_agreement": agree / weights, "kept_relative_difference": worst, "first_difference": first_difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smollm2")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prune-args", default="", help="more options for both runs, e.g. '--hessian-dtype float64'")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="threads of the one process (default: all cores); each rank gets cores / ranks")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("out"))
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("ONE", "TWO"),
                        help="only compare two saved outputs (the first tensor that differs, in block order)")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(*args.compare)))
        return
    extra = shlex.split(args.prune_args)
    preset = PRESETS[args.preset]
    if not (preset["model"] / "config.json").exists():
        raise SystemExit(f"{preset['model']} not found (see ../shared/assets/README.md)")
    if preset.get("split_half"):  # the calibration half of the stories, as quality.py uses
        stories = preset["calib"].read_text().split("\n\n")
        args.out.mkdir(parents=True, exist_ok=True)
        calib = args.out / f"{args.preset}-calib.txt"
        calib.write_text("\n\n".join(stories[:len(stories) // 2]))
        preset = {**preset, "calib": calib}
    cores = os.cpu_count() or 1
    single_threads, rank_threads = args.single_threads or cores, max(1, cores // args.ranks)
    print(f"machine: {machine()}")
    print(f"{preset['model'].name}: calibration {preset['nsamples']} x {preset['seqlen']} tokens of "
          f"{preset['calib'].name}; 1 process with {single_threads} threads against {args.ranks} gloo ranks with "
          f"{rank_threads} each; options: {' '.join(extra) or 'defaults'}\n")
    print("| method | masks equal | kept weights, max relative difference | time, 1 process | "
          f"time, {args.ranks} ranks | activation cache per rank | peak host RSS, rank 0 vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            one, two = Path(tmp) / "one", Path(tmp) / "two"
            single_seconds = timed_prune(preset, one, method, 1, single_threads, extra)
            split_seconds = timed_prune(preset, two, method, args.ranks, rank_threads, extra)
            measured = compare(one, two)
            reports = [json.loads((folder / "report.json").read_text()) for folder in (one, two)]
        cache = [r["memory_plan"]["activation_cache_bytes"] for r in reports]
        rss = [r["peak_host_rss_bytes"] for r in reports]
        results[method] = {**measured, "seconds": [single_seconds, split_seconds], "activation_cache_bytes": cache,
                           "peak_host_rss_bytes": rss}
        print(f"| {method} | {measured['mask_agreement']:.5%} | {measured['kept_relative_difference']:.2e} | "
              f"{single_seconds:.0f} s | {split_seconds:.0f} s | {cache[1] / 2**20:.0f} MiB (1 process: "
              f"{cache[0] / 2**20:.0f} MiB) | {rss[1] / 2**30:.2f} vs {rss[0] / 2**30:.2f} GiB |", flush=True)
    for method, measured in results.items():
        print(f"\n{method}: first tensor that differs, in block order: {measured['first_difference'] or 'none'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"distributed-{args.preset}.json").write_text(json.dumps(
        {"machine": machine(), "ranks": args.ranks, "options": extra, "threads": [single_threads, rank_threads],
         "results": results}, indent=1))


if __name__ == "__main__":
    main()
