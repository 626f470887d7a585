"""DeepSeek-V3's widths on a 24 GB CPU machine: two blocks, one dense and one of 256 experts, stored FP8.

    python bench/giant.py [--workdir DIR] [--nsamples 8] [--seqlen 256] [--expert-group-size auto]

The checkpoint is made here, tensor by tensor (nothing holds it whole): DeepSeek-V3's config.json with two
blocks (the first dense, `first_k_dense_replace` 1) and a vocabulary of 32,768 instead of 129,280 (the
embedding and head are not what this measures), every block weight but the router's stored as float8_e4m3
with 128 x 128 block scales as the release stores them: hidden 7168, multi-head latent attention, 256
routed experts of width 2048 (8 per token) and one shared expert. Its MoE block is 11.3 B parameters:
22.5 GB in bfloat16, 45 GB in the float32 a CPU computes in; on disk the checkpoint is about 12.4 GB.

It is pruned with Wanda 50 % on the CPU from windows of the demo text, the routed experts streamed in
groups (`auto`: the plan chooses them to fit the memory available), written back as FP8. Printed and
kept in WORKDIR/giant.json: the plan's peak of each phase against the measured one, the group size and
the seconds per expert group, the wall time, the sizes on disk; then the output is checked: the reader
(transformers' conversion mapping) accepts it, sampled experts have exactly half of each row zero once
dequantized, and transformers' own load is tried in a child process (on a CPU it dequantizes FP8 and fuses
the 256 experts into one 22.5 GB bfloat16 parameter: more than this machine has; its outcome is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from memory import machine

SHARD_BYTES = 2 << 30
VOCAB = 32768


def deepseek_v3_config():
    from transformers import DeepseekV3Config
    config = DeepseekV3Config(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=VOCAB, dtype="bfloat16", bos_token_id=256,
                              eos_token_id=257, pad_token_id=0, tie_word_embeddings=False)
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    return config


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the hub's checkpoint holds: the model's parameters, with the fused
    experts as the release stores them, one tensor per expert and projection."""
    from offload_prune.model.skeleton import build_skeleton
    model, _, _ = build_skeleton(config)
    out = []
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            experts, double, hidden = tensor.shape
            out += [(f"{name[:-len('gate_up_proj')]}{e}.{p}.weight", (double // 2, hidden))
                    for e in range(experts) for p in ("gate_proj", "up_proj")]
        elif name.endswith("mlp.experts.down_proj"):
            out += [(f"{name[:-len('down_proj')]}{e}.down_proj.weight", tuple(tensor.shape[1:]))
                    for e in range(tensor.shape[0])]
        else:
            out.append((name, tuple(tensor.shape)))
    return out


def build(folder: Path) -> None:
    """The checkpoint, shard by shard: each FP8 weight normal with std 1/sqrt(inputs) before quantization."""
    from offload_prune.demo import byte_tokenizer, demo_text
    from offload_prune.disk.fp8 import BlockFP8Weights
    config = deepseek_v3_config()
    fp8 = BlockFP8Weights(config.quantization_config, {}, {}, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    names = checkpoint_tensors(config)
    weight_map, shard, shard_bytes, number = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, number
        number += 1
        file = f"model-{number:05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard, shard_bytes = {}, 0

    for k, (name, shape) in enumerate(names):
        std = shape[-1] ** -0.5 if len(shape) == 2 else 1.0
        quantized = ".layers." in name and len(shape) == 2 and not name.endswith("mlp.gate.weight")
        if len(shape) == 1:
            value = torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=generator) * (std if quantized else 0.02)
        if quantized:
            shard[name], shard[name[:-len("weight")] + "weight_scale_inv"] = fp8.quantize(value)
        else:
            shard[name] = value.to(torch.float32 if "e_score_correction_bias" in name else torch.bfloat16)
        shard_bytes += value.numel() * (1 if quantized else 2)
        if shard_bytes >= SHARD_BYTES:
            flush()
        if k % 100 == 0:
            print(f"  built {k}/{len(names)} tensors", file=sys.stderr)
    if shard:
        flush()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "demo.txt").write_text(demo_text(seed=0))
    (folder / "built").write_text("ok\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def check_output(save: Path) -> dict:
    """What can be checked of the output on this machine: the reader (transformers' own conversion mapping
    and config.json) accepts every tensor's name and shape; sampled experts and the dense block's matrices,
    dequantized from the FP8 written, are exactly half zero: in each row where Wanda pruned them, over the
    matrix where too few tokens reached an expert and magnitude did (the report's rule); and transformers'
    own load, in a child process whose end is reported as it comes."""
    from offload_prune.disk.checkpoint import CheckpointReader
    reader = CheckpointReader(str(save))
    rules = {name: entry["rule"] for name, entry in json.loads((save / "report.json").read_text())["modules"].items()}
    # Each module as the report names it, and the checkpoint tensors it is read from (an expert's gate and up
    # projections are one fused module: magnitude's one threshold covers both).
    sampled = {f"model.layers.1.mlp.experts.{e}.{module}": [f"model.layers.1.mlp.experts.{e}.{p}.weight" for p in parts]
               for e in (0, 127, 255) for module, parts in (("gate_up_proj", ("gate_proj", "up_proj")),
                                                            ("down_proj", ("down_proj",)))}
    sampled.update({f"model.layers.0.mlp.{p}": [f"model.layers.0.mlp.{p}.weight"]
                    for p in ("gate_proj", "up_proj", "down_proj")})
    halves = {}
    for module, names in sampled.items():
        read = reader.read(names)
        weight, rule = torch.cat([read[n] for n in names]), rules[module]
        zeros = (weight == 0).sum(dim=1) if rule == "wanda" else (weight == 0).sum()
        halves[f"{module} ({rule})"] = bool((zeros == weight.shape[1] // 2 if rule == "wanda"
                                             else zeros == weight.numel() // 2).all())
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(save)], capture_output=True, text=True)
    outcome = ("loaded" if done.returncode == 0 else "killed by the kernel (out of memory)" if done.returncode == -9
               else f"failed: {done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else done.returncode}")
    return {"reader_accepts_every_tensor": True, "half_zero": halves,
            "transformers_load": {"outcome": outcome, "seconds": round(time.perf_counter() - started, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "offload-prune-giant")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--expert-group-size", default="auto")
    parser.add_argument("--skip-prune", action="store_true", help="check the output a previous run left")
    args = parser.parse_args()
    model, save = args.workdir / "model", args.workdir / "pruned"
    if not (model / "built").exists():
        started = time.perf_counter()
        build(model)
        print(f"built {model}: {folder_bytes(model) / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    command = [sys.executable, "-m", "offload_prune", "--model", str(model), "--save", str(save), "--overwrite",
               "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--calib-data", str(model / "demo.txt"),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu",
               "--expert-group-size", args.expert_group_size, "--offload-activations", "auto"]
    started = time.perf_counter()
    if not args.skip_prune:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"prune failed ({done.returncode}): {done.stderr[-2000:]}")
    wall = time.perf_counter() - started if not args.skip_prune else None
    report = json.loads((save / "report.json").read_text())
    plan = report["memory_plan"]
    phases = {phase: {"planned_host_gib": plan["phases"][phase]["host"] / 2**30,
                      "measured_host_gib": peaks["host"] / 2**30}
              for phase, peaks in report["phase_peaks"].items() if phase in plan["phases"]}
    seconds = [s for block in report["expert_groups"]["seconds_per_group"].values() for s in block]
    result = {"machine": machine(), "command": " ".join(command[1:]),
              "wall_seconds": round(wall, 1) if wall else sum(report["seconds"].values()),
              "input_gb": folder_bytes(model) / 1e9, "output_gb": folder_bytes(save) / 1e9,
              "expert_group_size": report["expert_groups"]["size"], "groups": report["expert_groups"]["groups"],
              "seconds_per_group": {"min": min(seconds), "median": sorted(seconds)[len(seconds) // 2],
                                    "max": max(seconds)},
              "phases": phases, "phase_seconds": report["seconds"],
              "moe_sparsity": report["totals"]["mlp"]["sparsity"]}
    for phase, values in phases.items():
        print(f"{phase:>12}: planned {values['planned_host_gib']:6.2f} GiB, measured "
              f"{values['measured_host_gib']:6.2f} GiB ({values['measured_host_gib'] / values['planned_host_gib']:.2f}x)")
    print(f"groups of {result['expert_group_size']}: {result['seconds_per_group']} s each; wall "
          f"{result['wall_seconds']:.0f} s; "
          f"{result['input_gb']:.1f} GB in, {result['output_gb']:.1f} GB out")
    result["output_checks"] = check_output(save)
    print(f"output: {result['output_checks']}")
    (args.workdir / "giant.json").write_text(json.dumps(result, indent=2))
    print(f"{machine()}; results: {args.workdir / 'giant.json'}")


if __name__ == "__main__":
    main()
