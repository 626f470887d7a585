"""Block-local reconstruction (--reconstruct) on the real models in ../shared/assets: perplexity, prune-phase
time and peak RSS of each method with and without it, against ADMM alone.

    python bench/reconstruction.py --preset smollm2                      # the table in docs/benchmarks.md
    python bench/reconstruction.py --preset stories260k
    python bench/reconstruction.py --preset smollm2 --rows wanda/50%/block/recon_lr=3e-4 admm/2:4/off

A row is method/setting/mode, then any PruneConfig options as key=value (numbers parsed); mode is off,
block or sublayer. Setting: 50%, 60%, 70%, 2:4, or structured settings: mlp25 (25 % of MLP neurons,
shrunk) and mlp25+heads (also a third of the key/value groups), as bench/structured.py prunes them, and
remove6 / remove1 (blocks removed, with shortgpt: its dense pass and copies count as the prune phase). Results go to out/reconstruction-<preset>.json
after every run; rows already there are not run again.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from quality import SETTINGS, Bench, open_row_table, parse_options, table_runs

# bench/structured.py's shrink settings: a quarter of the MLP neurons, and a third of the key/value groups.
STRUCTURED = {"mlp25": {"sparsity_type": "structured", "sparsity_ratio": 0.25, "shrink": True},
              "mlp25+heads": {"sparsity_type": "structured", "sparsity_ratio": 0.25, "shrink": True,
                              "prune_heads": 1 / 3},
              # ShortGPT's setting there: 20 % of the blocks (6 of SmolLM2's 30, 1 of stories260K's 5).
              "remove6": {"remove_layers": "6"}, "remove1": {"remove_layers": "1"}}
DEFAULT_ROWS = [
    "wanda/50%/off", "wanda/50%/block", "wanda/2:4/block",
    "admm/60%/off", "admm/60%/block", "admm/2:4/off", "admm/2:4/block",
    "wanda/50%/sublayer", "wanda/50%/block/recon_target=dense-stream",
    "flap/mlp25+heads/off", "flap/mlp25+heads/block",
]


def parse_row(row: str) -> tuple[str, dict]:
    method, setting, mode, *extra = row.split("/")
    return method, {**(SETTINGS.get(setting) or STRUCTURED[setting]), "reconstruct": mode, **parse_options(extra)}


def run_row(bench: Bench, row: str) -> dict:
    method, options = parse_row(row)
    with tempfile.TemporaryDirectory() as tmp:
        report = bench.prune(method, Path(tmp) / "out", **options)
        ppl = bench.perplexity(Path(tmp) / "out")
    blocks = (report.get("reconstruction") or {}).get("blocks", {})
    ratios = sorted(b["error_after"] / b["error_before"] for b in blocks.values() if b["error_before"])
    # A removal's work: its dense pass and its copies (trained with --reconstruct) in place of the prune phase.
    phases = [p for p in ("prune", "influence", "copy", "reconstruct") if p in report["seconds"]]
    return {"row": row, "ppl": ppl, "prune_seconds": sum(report["seconds"][p] for p in phases),
            "peak_rss_bytes": max(report["phase_peaks"][p]["host"] for p in phases),
            "planned_prune_host_bytes": max(report["memory_plan"]["phases"][p]["host"] for p in phases),
            "recon_kept": sum(b["kept"] for b in blocks.values()), "recon_blocks": len(blocks),
            "recon_median_error_ratio": ratios[len(ratios) // 2] if ratios else None,
            "recon_seconds": sum(b["seconds"] for b in blocks.values())}


def main() -> None:
    args, bench, path, results = open_row_table(__doc__, DEFAULT_ROWS, "reconstruction")
    print("| row | perplexity | prune phase | of which reconstruction | peak RSS (plan) | blocks kept | "
          "block error ratio (median) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for run in table_runs(bench, args.rows, results, path, run_row):
        ratio = f"{run['recon_median_error_ratio']:.3f}" if run["recon_median_error_ratio"] is not None else "-"
        print(f"| {run['row']} | {run['ppl']:.3f} | {run['prune_seconds']:.0f} s | {run['recon_seconds']:.0f} s | "
              f"{run['peak_rss_bytes'] / 2**30:.2f} GiB ({run['planned_prune_host_bytes'] / 2**30:.2f}) | "
              f"{run['recon_kept']}/{run['recon_blocks']} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
