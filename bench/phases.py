"""The memory plan against what a run measures, phase by phase, on a real model.

    python bench/phases.py --preset smollm2   # SmolLM2-135M (../shared/assets/get_smollm2.sh), ~6 min on 2 cores
    python bench/phases.py --model DIR [offload-prune flags...]
    python bench/phases.py --replan OUT/report.json   # a finished run's peaks against today's plan for it

Each run is a fresh `offload-prune` process; report.json holds the plan (`memory_plan.phases`) and
the peak of each phase (`phase_peaks`: host VmHWM reset at each phase start, and on CUDA the
allocator's peak reserved bytes). Every phase is entered: calibration, capture, prune, write (with
the head pruned), and both evaluations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import machine

GIB = 2**30
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SMOLLM2 = Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m"))
PRESETS = {"smollm2": ["--model", str(SMOLLM2), "--calib-data", str(ASSETS / "data" / "wikitext2_valid_tokens.txt"),
                       "--nsamples", "16", "--seqlen", "1024", "--eval-ppl", "--eval-data",
                       str(ASSETS / "data" / "wikitext2_test.txt"), "--eval-max-windows", "4", "--nr-prune-lm-head"]}


def run(flags: list[str], save: Path) -> dict:
    command = [sys.executable, "-m", "offload_prune", *flags, "--save", str(save), "--overwrite", "--quiet"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"offload-prune failed:\n{result.stderr[-3000:]}")
    report = json.loads((save / "report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def phase_table(report: dict) -> str:
    """Markdown rows: phase, planned and measured host peak (and device peak on CUDA), ratio."""
    planned = report["memory_plan"]["phases"]
    cuda = report["memory_plan"]["device_type"] == "cuda"
    lines = ["| phase | planned host | measured host | measured / planned |"
             + (" planned device | measured device (reserved) |" if cuda else ""),
             "|---|---|---|---|" + ("---|---|" if cuda else "")]
    for phase, peaks in report["phase_peaks"].items():
        plan = planned["eval" if phase.startswith("eval") else phase]
        line = (f"| {phase} | {plan['host'] / GIB:.2f} GiB | {peaks['host'] / GIB:.2f} GiB | "
                f"{peaks['host'] / plan['host']:.2f} |")
        if cuda:
            line += f" {plan['device'] / GIB:.2f} GiB | {(peaks['device_reserved'] or 0) / GIB:.2f} GiB |"
        lines.append(line)
    return "\n".join(lines)


def replan(report: dict) -> dict:
    """The report with its plan recomputed by the current plan.py, from the inputs the run planned with."""
    from transformers import AutoConfig

    from offload_prune.config import PruneConfig
    from offload_prune.plan.memory import TOKENIZE_BYTES_PER_TEXT_BYTE, memory_plan
    old = report["memory_plan"]
    hosts = {name: phase["host_parts"] for name, phase in old["phases"].items()}
    options = {k: v for k, v in report["options"].items() if k != "prune_method"}
    config = PruneConfig(model=report["model"], prune_method=report["method"], **options,
                         offload_activations="ram" if "activation_cache" in hosts["prune"] else "disk").validate()
    text = hosts["calibration"].get("text_and_tokens", 0) // TOKENIZE_BYTES_PER_TEXT_BYTE
    plan = memory_plan(config, AutoConfig.from_pretrained(report["model"]), old["device_type"], text,
                       old.get("eval_windows", 0), process_bytes=hosts["calibration"]["process"])
    return {**report, "memory_plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replan", type=Path, help="a finished run's report.json")
    parser.add_argument("--preset", choices=PRESETS)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--out", type=Path, default=Path("out"))
    args, flags = parser.parse_known_args()
    if args.replan:
        print(phase_table(replan(json.loads(args.replan.read_text()))))
        return
    flags = PRESETS[args.preset] + flags if args.preset else flags
    print(f"machine: {machine()}")
    print(f"offload-prune {' '.join(flags)}\n")
    for method in args.methods:
        report = run(flags + ["--prune_method", method], args.out / f"phases-{method}")
        print(f"{method}: {report['wall_seconds']:.0f} s, perplexity dense "
              f"{report['perplexity']['dense']['ppl']:.3f} -> pruned {report['perplexity']['pruned']['ppl']:.3f}"
              if "perplexity" in report else f"{method}: {report['wall_seconds']:.0f} s")
        print(phase_table(report) + "\n")


if __name__ == "__main__":
    main()
