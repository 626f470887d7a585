"""Peak host RSS and wall time of streamed Wanda pruning against a whole-model baseline.

Synthetic fp16 Llama checkpoints of growing size (same width, more layers) are written tensor by
tensor; each run happens in a fresh process so its peak RSS (VmHWM) is its own. The baseline
loads the whole model with from_pretrained and runs the same Wanda code layer by layer (as the
Wanda repository does), then save_pretrained. Both compute in float32 on the CPU.

    python bench/memory.py                       # 0.5, 1, 2, 4 GB
    python bench/memory.py --sizes-gb 0.5 1      # quicker
    python bench/memory.py --sizes-gb 2 --repeats 3   # the --overlap-io goal: streaming vs whole model
                                                      # (the fastest of 3 in the table, every run below it)
    python bench/memory.py --sizes-gb 2 --repeats 3 --cold-cache   # the same, the checkpoint read from the disk

Streaming runs twice per size: with --overlap-io (the default: the next block read and the last one
written on helper threads) and without (everything in series).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from synthetic import build_checkpoint

WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=8192, tie_word_embeddings=False)


def vm_hwm() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def child_streaming(model: Path, save: Path, nsamples: int, seqlen: int, overlap_io: bool = True) -> dict:
    from offload_prune.config import PruneConfig
    from offload_prune.stream.pipeline import prune
    start = time.perf_counter()
    prune(PruneConfig(model=str(model), save=save, prune_method="wanda", calib_data=str(model / "demo.txt"),
                      nsamples=nsamples, seqlen=seqlen, overwrite=True, quiet=True, overlap_io=overlap_io))
    return {"seconds": time.perf_counter() - start, "peak_rss": vm_hwm()}


def child_serial(model: Path, save: Path, nsamples: int, seqlen: int) -> dict:
    """Streaming with --overlap-io off: every read and write in series with the compute."""
    return child_streaming(model, save, nsamples, seqlen, overlap_io=False)


@torch.no_grad()
def whole_model_prune(model: Path, save: Path, method_name: str, nsamples: int, seqlen: int,
                      device: torch.device, dtype: torch.dtype) -> dict:
    """The reference tools' way: the whole model loaded on `device`, the calibration inputs caught at
    layer 0 and kept there, then layer by layer the method's statistics, its prune and the
    propagation (the same method code the stream runs), and save_pretrained in fp16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload_prune.data.calibration import load_text, sample_windows, tokenize
    from offload_prune.config import PruneConfig
    from offload_prune.methods import build_method
    from offload_prune.model.matrices import describe, find_matrices
    from offload_prune.stream.passes import collect
    from offload_prune.model.skeleton import run_windows

    start = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    config = PruneConfig(model=str(model), prune_method=method_name, micro_batch_size=1, nsamples=nsamples, seqlen=seqlen).validate()
    method = build_method(config, lm.config)
    windows = sample_windows(tokenize(AutoTokenizer.from_pretrained(model), load_text(str(model / "demo.txt"))),
                             nsamples, seqlen, 0)
    loaded = time.perf_counter()
    caught, kwargs = [], {}

    class Catcher(torch.nn.Module):
        def forward(self, hidden_states, **layer_kwargs):
            caught.append(hidden_states)
            kwargs.update(layer_kwargs)
            raise ValueError

    layers, first = lm.model.layers, lm.model.layers[0]
    layers[0] = Catcher()
    for i in range(nsamples):
        try:
            lm(windows[i:i + 1].to(device), use_cache=False)
        except ValueError:
            pass
    layers[0] = first
    hidden = torch.cat(caught)
    caught.clear()
    for layer in layers:
        matrices = find_matrices(layer)
        describe(layer, matrices)
        for group in method.groups(matrices):
            members = {n: matrices[n] for n in group}
            for calibration_pass in range(method.calibration_passes if method.needs_calibration else 0):
                method.start_pass(calibration_pass)
                collect(method, layer, members, kwargs, hidden, config, device)
            method.prune(members, config.sparsity_ratio)
        run_windows(layer, kwargs, hidden, hidden, 1, device)
    pruned = time.perf_counter()
    lm.to(torch.float16).save_pretrained(save)
    return {"seconds": time.perf_counter() - start, "load_seconds": loaded - start, "prune_seconds": pruned - loaded,
            "peak_rss": vm_hwm(),
            "peak_device_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None}


def child_in_memory(model: Path, save: Path, nsamples: int, seqlen: int) -> dict:
    return whole_model_prune(model, save, "wanda", nsamples, seqlen, torch.device("cpu"), torch.float32)


def drop_page_cache() -> None:
    """Empty the kernel's page cache, so that the next run reads the checkpoint from the disk (Linux, root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold-cache needs to write /proc/sys/vm/drop_caches (Linux, as root): {exc}") from None


def run_child(mode: str, model: Path, save: Path, args) -> dict:
    if args.cold_cache:
        drop_page_cache()
    command = [sys.executable, __file__, "--child", mode, "--model", str(model), "--save", str(save),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-2000:]}")
    shutil.rmtree(save, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def fastest(runs: list[dict]) -> dict:
    """The fastest run's time with the highest peak RSS of all runs (the peak does not depend on luck)."""
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__}, {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1, 2, 4])
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "offload-prune-bench")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode, in rotation; the fastest counts")
    parser.add_argument("--cold-cache", action="store_true",
                        help="empty the page cache before every run: the checkpoint is read from the disk, as a "
                             "model larger than RAM always is (needs root)")
    parser.add_argument("--child", choices=["streaming", "serial", "in_memory"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    if args.child:
        child = {"streaming": child_streaming, "serial": child_serial, "in_memory": child_in_memory}[args.child]
        print(json.dumps(child(args.model, args.save, args.nsamples, args.seqlen)))
        return

    h, i = WIDTH["hidden_size"], WIDTH["intermediate_size"]
    kv = h * WIDTH["num_key_value_heads"] // WIDTH["num_attention_heads"]
    block_bytes = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    outside_bytes = 2 * (2 * WIDTH["vocab_size"] * h + h)
    print(f"machine: {machine()}")
    print(f"Llama width {h}/{i}, fp16 block {block_bytes / 2**20:.0f} MiB; Wanda 50%, "
          f"{args.nsamples} x {args.seqlen} calibration tokens; float32 compute on CPU; checkpoint "
          f"{'read from the disk (page cache emptied before each run)' if args.cold_cache else 'in the page cache'}\n")
    print("| checkpoint | layers | streaming peak RSS | RSS / size | streaming time | without --overlap-io "
          "| in-memory peak RSS | in-memory time | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for gb in args.sizes_gb:
        layers = max(1, round((gb * 2**30 - outside_bytes) / block_bytes))
        model = args.workdir / f"llama-{layers}L"
        if not (model / "config.json").exists():
            build_checkpoint(model, LlamaConfig(num_hidden_layers=layers, bos_token_id=256, eos_token_id=257,
                                                dtype="float16", **WIDTH))
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        modes = ["streaming", "serial"] + ([] if args.skip_baseline else ["in_memory"])
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # in rotation, so a busy moment of the machine hits every mode alike
            for mode in modes:
                runs[mode].append(run_child(mode, model, args.workdir / f"out-{mode}", args))
        streamed, serial = fastest(runs["streaming"]), fastest(runs["serial"])
        row = (f"| {size / 2**30:.2f} GiB | {layers} | {streamed['peak_rss'] / 2**30:.2f} GiB | "
               f"{streamed['peak_rss'] / size:.2f} | {streamed['seconds']:.0f} s | {serial['seconds']:.0f} s "
               f"({serial['peak_rss'] / 2**30:.2f} GiB) |")
        if args.skip_baseline:
            row += " - | - | - |"
        else:
            whole = fastest(runs["in_memory"])
            row += (f" {whole['peak_rss'] / 2**30:.2f} GiB | {whole['seconds']:.0f} s | "
                    f"{streamed['seconds'] / whole['seconds']:.2f} |")
        print(row, flush=True)
        if args.repeats > 1:  # the spread between runs of one build, beside the fastest
            print("  every run: " + "; ".join(f"{mode} " + " ".join(f"{r['seconds']:.1f}" for r in results)
                                              for mode, results in runs.items()) + " s", flush=True)
            if not args.skip_baseline:
                medians = {mode: statistics.median(r["seconds"] for r in results) for mode, results in runs.items()}
                print(f"  medians: streaming {medians['streaming']:.1f} s, without --overlap-io "
                      f"{medians['serial']:.1f} s, in-memory {medians['in_memory']:.1f} s; time ratio "
                      f"{medians['streaming'] / medians['in_memory']:.2f}", flush=True)


if __name__ == "__main__":
    main()
