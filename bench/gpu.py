"""The CUDA path, measured, in one command on any CUDA machine.

    python bench/gpu.py                                   # every part below (~20-30 min on one H100)
    python bench/gpu.py --parts 70b-block 7b-wanda        # some of them
    python bench/gpu.py --device cpu --layers 2 --nsamples 2 --seqlen 64 --width small   # a dry run anywhere

Parts (each one a fresh process; its result is added to OUT/gpu.json as soon as it is done, and a
part already there is not run again, so a machine taken away halfway loses nothing finished):

- `7b-wanda`, `7b-sparsegpt`: a synthetic checkpoint in LLaMA-2-7B's shapes (32 blocks, fp16, random
  weights) pruned by offload-prune, 128 x 2048 calibration tokens, `--offload-activations auto` (on
  the GPU when the plan fits it): wall time, time per block, and each phase's peak
  `max_memory_reserved` against the plan.
- `7b-wanda-ram`: the same as `7b-wanda` with the activation cache in page-locked host RAM
  (`--offload-activations ram`), against which the GPU-resident cache is measured.
- `70b-block`: one block in LLaMA-2-70B's shapes, SparseGPT, 128 x 2048, the cache in host RAM (as on
  a 24 GB GPU): peak device memory against the plan and the 20 GiB goal.
- `7b-whole-wanda`, `7b-whole-sparsegpt`: the same work with the whole model on the GPU (from_pretrained,
  the layer-0 inputs kept on the GPU, the same method code layer by layer, save_pretrained), the
  in-memory baseline.
- `7b-profile-wanda`, `7b-profile-sparsegpt`: two blocks of the 7B shape pruned under torch.profiler:
  the operators taking the device's time (on the CPU, the host's), whole table in OUT/PART.txt. They
  say whether a fused kernel is worth writing: only if the SparseGPT column loop or the mask selection
  dominates.

The checkpoints are written under --workdir (13 GiB for the 7B shape, 1.7 GiB for the 70B block).

    python bench/gpu.py --smoke        # the CUDA path end to end, ~8 min of one H100 (issue #28)

`--smoke` runs SMOKE_PARTS instead, each in its own process, results in OUT/gpu.json beside the rest:
two blocks of the 7B shape with Wanda (activations in page-locked RAM) and SparseGPT (on the device),
the same SparseGPT run killed halfway and resumed (its shards compared by sha256 with the uninterrupted
run), RIA 2:4 with --ria-permute, one 70B-shaped block with SparseGPT and with ADMM (the plan's device
peak against max_memory_allocated and max_memory_reserved: the cuSOLVER square of cholesky_inverse
is planned), and a profile of the SparseGPT blocks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from memory import machine, whole_model_prune
from phases import phase_table
from phases import run as run_offload_prune
from synthetic import build_checkpoint

WIDTHS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4),
}
#: part: (shape, method, how: the activation store of a streamed run, "whole" for the whole-model
#: baseline, "profile" for PROFILED_BLOCKS blocks under torch.profiler)
PARTS = {"70b-block": ("70b", "sparsegpt", "ram"), "7b-wanda": ("7b", "wanda", "auto"),
         "7b-wanda-ram": ("7b", "wanda", "ram"), "7b-sparsegpt": ("7b", "sparsegpt", "auto"),
         "7b-whole-wanda": ("7b", "wanda", "whole"), "7b-whole-sparsegpt": ("7b", "sparsegpt", "whole"),
         "7b-profile-wanda": ("7b", "wanda", "profile"), "7b-profile-sparsegpt": ("7b", "sparsegpt", "profile")}
PROFILED_BLOCKS = 2
#: --smoke: part -> (shape, blocks, method, activation store or "profile" / "resume", extra flags, nsamples);
#: calibration of 32 x 2048 tokens except on the 70B block, which is planned and measured at 128 x 2048.
SMOKE_PARTS = {
    "smoke-7b-wanda-ram": ("7b", 2, "wanda", "ram", [], 32),
    "smoke-7b-sparsegpt-device": ("7b", 2, "sparsegpt", "device", [], 32),
    "smoke-7b-sparsegpt-resume": ("7b", 2, "sparsegpt", "resume", [], 32),
    "smoke-7b-ria-permute": ("7b", 2, "ria", "ram", ["--sparsity_type", "2:4", "--ria-permute"], 32),
    "smoke-70b-sparsegpt": ("70b", 1, "sparsegpt", "ram", [], 128),
    "smoke-70b-admm": ("70b", 1, "admm", "ram", [], 128),
    "smoke-7b-profile-sparsegpt": ("7b", 2, "sparsegpt", "profile", [], 32),
}
#: The resumed run is killed as block 1's inputs are renamed into place (block 0 being committed).
SMOKE_KILL_STEP = "rename:acts_00001.bin"
GIB = 2**30


def checkpoint(args, shape: str, layers: int) -> Path:
    width = WIDTHS["small" if args.width == "small" else shape]
    folder = args.workdir / f"llama-{args.width if args.width == 'small' else shape}-{layers}L"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, LlamaConfig(num_hidden_layers=layers, vocab_size=32000, bos_token_id=256,
                                             eos_token_id=257, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                             tie_word_embeddings=False, dtype="float16", **width))
    return folder


def prune_flags(args, model: Path, method: str, store: str) -> list[str]:
    return ["--model", str(model), "--prune_method", method, "--calib-data", str(model / "demo.txt"),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device,
            "--offload-activations", store]


def streamed(args, model: Path, method: str, store: str, extra: list[str] = ()) -> dict:
    report = run_offload_prune([*prune_flags(args, model, method, store), *extra],
                               args.workdir / f"out-{model.name}-{method}-{store}")
    plan = report["memory_plan"]
    return {"activation_store": plan["activation_store"], "wall_seconds": report["wall_seconds"],
            "phase_seconds": report["seconds"],
            "seconds_per_block": report["seconds"]["prune"] / plan["num_layers"],
            "peak_device_reserved": report["peak_device_bytes"], "planned_device": plan["device"]["peak"],
            "peak_host_rss": report["peak_host_rss_bytes"], "planned_host": plan["host"]["peak"],
            "phases": phase_table(report)}


def smoke(args) -> dict:
    """One part of --smoke, in this (fresh) process."""
    shape, layers, method, how, extra, nsamples = SMOKE_PARTS[args.child]
    args.nsamples = nsamples
    model = checkpoint(args, shape, layers)
    if how == "profile":
        return profiled(args, model, method)
    flags = prune_flags(args, model, method, "device" if how == "resume" else how) + extra
    if how != "resume":
        result = streamed(args, model, method, how, extra)
        report = json.loads((args.workdir / f"out-{model.name}-{method}-{how}" / "report.json").read_text())
        result["phase_peaks"] = report["phase_peaks"]
        result["peak_device_allocated"] = max((p.get("device_allocated") or 0) for p in report["phase_peaks"].values())
        result["plan_method"] = report["memory_plan"]["method"]
        return result
    uninterrupted, resumed = args.workdir / "smoke-uninterrupted", args.workdir / "smoke-resumed"
    for folder, env in ((uninterrupted, {}), (resumed, {"OFFLOAD_PRUNE_KILL_AT_STEP": SMOKE_KILL_STEP})):
        done = subprocess.run([sys.executable, "-m", "offload_prune", *flags, "--save", str(folder), "--overwrite",
                               "--quiet"], capture_output=True, text=True, env={**os.environ, **env})
        killed = done.returncode == -9
        if done.returncode and not killed:
            raise SystemExit(f"offload-prune exited {done.returncode}:\n{done.stderr[-3000:]}")
    again = subprocess.run([sys.executable, "-m", "offload_prune", *flags, "--save", str(resumed), "--resume",
                            "--quiet"], capture_output=True, text=True)
    if again.returncode:
        raise SystemExit(f"the resumed run exited {again.returncode}:\n{again.stderr[-3000:]}")
    digests = [{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}
               for folder in (uninterrupted, resumed)]
    return {"killed_at": SMOKE_KILL_STEP, "was_killed": killed, "shards": len(digests[0]),
            "identical_to_uninterrupted": digests[0] == digests[1] and bool(digests[0])}


def child(args) -> dict:
    """One part, in this (fresh) process."""
    if args.child in SMOKE_PARTS:
        return smoke(args)
    shape, method, how = PARTS[args.child]
    if how == "profile":
        return profiled(args, checkpoint(args, shape, PROFILED_BLOCKS), method)
    model = checkpoint(args, shape, 1 if shape == "70b" else args.layers)
    if how == "whole":
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        return whole_model_prune(model, args.workdir / f"out-{model.name}-whole", method,
                                 args.nsamples, args.seqlen, torch.device(args.device), dtype)
    return streamed(args, model, method, how)


def profiled(args, model: Path, method: str) -> dict:
    """A run in this process under torch.profiler; the operators by their own (self) time on the device,
    or on the host when computing on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from offload_prune.cli import main as offload_prune

    cuda = args.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        code = offload_prune([*prune_flags(args, model, method, "auto"), "--save",
                              str(args.workdir / f"out-{model.name}-{method}-profiled"), "--overwrite", "--quiet"])
    if code:
        raise SystemExit(f"offload-prune exited {code}")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = profiler.key_averages()
    (args.out / f"{args.child}.txt").write_text(events.table(sort_by=key, row_limit=40))
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:12]
    return {"profiled_blocks": PROFILED_BLOCKS, "self_seconds_total": total / 1e6, "clock": "device" if cuda else "host",
            "top_self_share": {e.key: round(getattr(e, key) / total, 4) for e in top},
            "top_calls": {e.key: e.count for e in top}}


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    return "CPU"


def summary(results: dict) -> str:
    lines = ["| part | activations | wall | per block | peak device allocated | peak device reserved | device plan | "
             "peak host RSS | host plan |", "|---|---|---|---|---|---|---|---|---|"]
    for part, r in results.items():
        if "identical_to_uninterrupted" in r:
            lines.append(f"| {part} | killed at {r['killed_at']} ({r['was_killed']}), resumed: shards "
                         f"{'identical' if r['identical_to_uninterrupted'] else 'DIFFERENT'} | | | | | | | |")
            continue
        if "top_self_share" in r:
            continue  # printed apart, by profile()
        gib = lambda key: f"{r[key] / GIB:.2f} GiB" if r.get(key) is not None else "-"  # noqa: E731
        wall = r.get("wall_seconds", r.get("seconds"))
        per_block = f"{r['seconds_per_block']:.1f} s" if "seconds_per_block" in r else "-"
        lines.append(f"| {part} | {r.get('activation_store', 'whole model')} | {wall:.0f} s | {per_block} | {gib('peak_device_allocated')} | {gib('peak_device_reserved')} | {gib('planned_device')} | "
                     f"{gib('peak_host_rss') if 'peak_host_rss' in r else gib('peak_rss')} | {gib('planned_host')} |")
    return "\n".join(lines)


def profile(result: dict) -> str:
    lines = [f"{result['profiled_blocks']} blocks, {result['self_seconds_total']:.1f} s of {result['clock']} time; "
             "operators by their own time:", "| operator | share | calls |", "|---|---|---|"]
    lines += [f"| {name} | {share:.1%} | {result['top_calls'][name]} |" for name, share in result["top_self_share"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=[*PARTS, *SMOKE_PARTS], default=list(PARTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32, help="blocks of the 7B-shaped checkpoint")
    parser.add_argument("--width", choices=["real", "small"], default="real", help="small: a dry run's shapes")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "offload-prune-gpu")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--child", choices=[*PARTS, *SMOKE_PARTS])
    parser.add_argument("--smoke", action="store_true", help="the CUDA path end to end in ~8 minutes (SMOKE_PARTS)")
    args = parser.parse_args()
    if args.smoke and not args.child:
        args.parts = list(SMOKE_PARTS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args)))
        return

    results_file = args.out / "gpu.json"
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    print(f"machine: {machine()}; device: {describe_device(args.device)}")
    print(f"LLaMA-2 shapes ({args.width}), fp16 checkpoints, {args.nsamples} x {args.seqlen} calibration tokens\n")
    for part in args.parts:
        if part in results:
            continue
        command = [sys.executable, __file__, "--child", part, *sys.argv[1:]]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        print(f"{part}: {time.perf_counter() - started:.0f} s", flush=True)
        if done.returncode:
            print(f"{part} failed:\n{done.stderr[-3000:]}")
            continue
        results[part] = {**json.loads(done.stdout.strip().splitlines()[-1]), "device": describe_device(args.device)}
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{part}: done", flush=True)
        if "phases" in results[part]:
            print(results[part]["phases"] + "\n", flush=True)
        if "top_self_share" in results[part]:
            print(profile(results[part]) + "\n", flush=True)
    print(summary({p: results[p] for p in args.parts if p in results}))


if __name__ == "__main__":
    main()
