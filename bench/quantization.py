"""--quantize on the real models in ../shared/assets: perplexity, size on disk, prune-phase time and peak RSS
of pruning alone, then with RTN, GPTQ after the mask, and SparseGPT's joint sweep.

    python bench/quantization.py --preset smollm2           # the table in docs/benchmarks.md
    python bench/quantization.py --preset smollm2 --rows sparsegpt/50%/quantize=w4a16/quant_group_size=64

A row is method/setting, then any PruneConfig options as key=value (numbers parsed). Setting: 0% (quantize
only), 50%, 60%, 70% or 2:4. SmolLM2's width 576 is not a multiple of 128, so its rows use groups of 64.
Results go to out/quantization-<preset>.json after every run; rows already there are not run again.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from quality import SETTINGS, Bench, open_row_table, parse_options, table_runs

W4 = "quantize=w4a16/quant_group_size=64"
ORDERED = "/quant_act_order=1"  # rows without it run GPTQ in column order
DEFAULT_ROWS = [
    "sparsegpt/0%/" + W4, "sparsegpt/0%/" + W4 + ORDERED,
    "wanda/50%", "wanda/50%/" + W4 + "/quant_method=rtn", "wanda/50%/" + W4, "wanda/50%/" + W4 + ORDERED,
    "sparsegpt/50%", "sparsegpt/50%/" + W4, "sparsegpt/50%/" + W4 + ORDERED, "sparsegpt/50%/" + W4 + "/quant_joint=1",
    "sparsegpt/50%/quantize=w8a16/quant_group_size=64",
    "sparsegpt/2:4", "sparsegpt/2:4/" + W4, "sparsegpt/2:4/" + W4 + ORDERED, "sparsegpt/2:4/" + W4 + "/quant_joint=1",
]


def run_row(bench: Bench, row: str) -> dict:
    method, setting, *extra = row.split("/")
    options = {**SETTINGS[setting], **parse_options(extra)}
    options["quant_joint"] = bool(options.get("quant_joint", False))
    options["quant_act_order"] = bool(options.get("quant_act_order", False))
    with tempfile.TemporaryDirectory() as tmp:
        report = bench.prune(method, Path(tmp) / "out", **options)
        ppl = bench.perplexity(Path(tmp) / "out")
        size = sum(f.stat().st_size for f in (Path(tmp) / "out").glob("*.safetensors"))
    return {"row": row, "ppl": ppl, "bytes": size, "prune_seconds": report["seconds"]["prune"],
            "peak_rss_bytes": report["phase_peaks"]["prune"]["host"],
            "planned_prune_host_bytes": report["memory_plan"]["phases"]["prune"]["host"]}


def main() -> None:
    args, bench, path, results = open_row_table(__doc__, DEFAULT_ROWS, "quantization")
    print("| row | perplexity | safetensors on disk | prune phase | peak RSS (plan) |")
    print("|---|---|---|---|---|", flush=True)
    for run in table_runs(bench, args.rows, results, path, run_row):
        print(f"| {run['row']} | {run['ppl']:.3f} | {run['bytes'] / 2**20:.1f} MiB | {run['prune_seconds']:.0f} s | "
              f"{run['peak_rss_bytes'] / 2**30:.2f} GiB ({run['planned_prune_host_bytes'] / 2**30:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
