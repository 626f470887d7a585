"""Perplexity, prune time and peak memory of every method at 50 %, 60 %, 70 % and 2:4, with and
without OWL layer sparsities, on the real models in ../shared/assets.

    python bench/quality.py --preset stories260k     # TinyStories model on TinyStories text (~3 min)
    python bench/quality.py --preset smollm2         # SmolLM2-135M on WikiText-2 (build it first with
                                                     # ../shared/assets/get_smollm2.sh; ~1 h on 2 cores)
    python bench/quality.py --preset smollm2 --methods wanda admm --settings 50% 2:4 --layers uniform

Calibration: random windows of the calibration text (seed 0); evaluation: non-overlapping
windows of the evaluation text, as SparseGPT/Wanda compute WikiText-2 perplexity. Every method
runs with its defaults. Time is the run minus evaluation (calibration, OWL's dense pass, capture,
prune, write); memory is the peak RSS of those phases (the process also holds the evaluation
tokens). Results are written to quality-<preset>.json after every run, and a .png plot at the end;
runs already in that file are not run again (delete it to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from memory import machine

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
PRESETS = {
    # The 46 stories are split: the first half calibrates, the second half is evaluated.
    "stories260k": dict(model=ASSETS / "models" / "stories260K", calib=ASSETS / "data" / "tinystories_valid_sample.txt",
                        eval=ASSETS / "data" / "tinystories_valid_sample.txt", split_half=True, nsamples=64,
                        seqlen=256, eval_seqlen=512, eval_max_windows=None),
    "smollm2": dict(model=Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m")),
                    calib=ASSETS / "data" / "wikitext2_valid_tokens.txt", eval=ASSETS / "data" / "wikitext2_test.txt",
                    nsamples=16, seqlen=512, eval_seqlen=2048, eval_max_windows=8),
}
METHODS = ["magnitude", "wanda", "sparsegpt", "admm", "ria", "neuronrank_old", "neuronrank_tfidf", "hybrid"]
SETTINGS = {"0%": {"sparsity_ratio": 0.0}, "50%": {"sparsity_ratio": 0.5}, "60%": {"sparsity_ratio": 0.6}, "70%": {"sparsity_ratio": 0.7},
            "2:4": {"sparsity_type": "2:4"}}
TIMED_PHASES = ("calibration", "owl", "capture", "prune", "write")


def parse_options(items: list[str]) -> dict:
    """key=value PruneConfig options from a bench row, numbers and True/False parsed."""
    options = {}
    for item in items:
        key, value = item.split("=", 1)
        if value in ("True", "False"):
            options[key] = value == "True"
            continue
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return options


class Bench:
    """One preset: its calibration and evaluation text, and runs of the pruner against it."""

    def __init__(self, preset_name: str, out: Path, preset: dict | None = None):
        from offload_prune.evaluation.perplexity import evaluation_windows
        from offload_prune.model.loading import load_tokenizer

        preset = preset or PRESETS[preset_name]
        if not (preset["model"] / "config.json").exists():
            raise SystemExit(f"{preset['model']} not found (see ../shared/assets/README.md)")
        out.mkdir(parents=True, exist_ok=True)
        if preset.get("split_half"):
            stories = preset["calib"].read_text().split("\n\n")
            half = len(stories) // 2
            for part, chunk in (("calib", stories[:half]), ("eval", stories[half:])):
                path = out / f"{preset_name}-{part}.txt"
                path.write_text("\n\n".join(chunk))
                preset = {**preset, part: path}
        self.name, self.preset = preset_name, preset
        self.eval_ids = evaluation_windows(str(preset["eval"]), load_tokenizer(preset["model"]), preset["eval_seqlen"],
                                           preset["eval_max_windows"]) if preset.get("eval") else None

    def describe(self) -> str:
        p = self.preset
        calibration = (f"machine: {machine()}\n{p['model'].name}: calibration {p['nsamples']} x {p['seqlen']} "
                       f"tokens of {p['calib'].name} (seed 0)")
        if not p.get("eval"):
            return calibration + "; random weights: no perplexity"
        return (calibration + f"; perplexity on {p['eval'].name}, {p['eval_seqlen']}-token windows"
                + (f", first {p['eval_max_windows']}" if p["eval_max_windows"] else ", all"))

    def results(self, path: Path) -> dict:
        """The results kept in `path` (the runs there are reused: a table fills in over several invocations),
        with the dense model's perplexity."""
        results = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "runs": []}
        if "dense" not in results:
            results["dense"] = self.perplexity(self.preset["model"])
        return results

    def perplexity(self, folder: Path) -> float | None:
        from offload_prune.disk.checkpoint import CheckpointReader
        from offload_prune.evaluation.perplexity import perplexity
        if self.eval_ids is None:
            return None
        return perplexity(CheckpointReader(str(folder)), self.eval_ids, torch.device("cpu"), torch.float32,
                          quiet=True)["ppl"]

    def prune(self, method: str, save: Path, **options) -> dict:
        """Prune the preset's model into `save` with its calibration; returns the run's report."""
        from offload_prune.config import PruneConfig
        from offload_prune.stream.pipeline import prune

        p = self.preset
        settings = {"nsamples": p["nsamples"], "seqlen": p["seqlen"], "quiet": True, **options}
        return prune(PruneConfig(model=str(p["model"]), save=save, prune_method=method, calib_data=str(p["calib"]),
                                 **settings))

    def run(self, method: str, **options) -> dict:
        """Prune with these options, then measure; the pruned model is deleted afterwards."""
        with tempfile.TemporaryDirectory() as tmp:
            report = self.prune(method, Path(tmp) / "out", **options)
            ppl = self.perplexity(Path(tmp) / "out")
        phases = [phase for phase in TIMED_PHASES if phase in report["seconds"]]
        return {"ppl": ppl, "seconds": sum(report["seconds"][phase] for phase in phases),
                "peak_rss_bytes": max(report["phase_peaks"][phase]["host"] for phase in phases),
                "sparsity": report["totals"]["all"]["sparsity"],
                "ratios": report["layer_sparsity"]["ratios"]}


def open_row_table(description: str, default_rows: list[str], table: str) -> tuple[argparse.Namespace, "Bench", Path, dict]:
    """A row bench's command line (--preset, --rows, --out), its table opened and the dense perplexity printed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="stories260k")
    parser.add_argument("--rows", nargs="+", default=default_rows)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    bench, path, results = open_table(args.preset, args.out, table)
    print(f"dense perplexity {results['dense']:.3f}\n")
    return args, bench, path, results


def table_runs(bench: "Bench", rows: list[str], results: dict, path: Path, run_row) -> Iterator[dict]:
    """Each row's run, from `results` when it is there, else made by `run_row(bench, row)` and saved to
    `path` at once (an interrupted table keeps what it measured)."""
    done = {r["row"]: r for r in results["runs"]}
    for row in rows:
        run = done.get(row)
        if run is None:
            run = run_row(bench, row)
            results["runs"].append(run)
            path.write_text(json.dumps(results, indent=1))
        yield run


def open_table(preset: str, out: Path, table: str) -> tuple[Bench, Path, dict]:
    """The preset's bench, described on stdout, and the results file `out/<table>-<preset>.json` with its runs."""
    bench = Bench(preset, out)
    print(bench.describe() + "\n")
    path = out / f"{table}-{preset}.json"
    return bench, path, bench.results(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="stories260k")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--layers", nargs="+", choices=("uniform", "owl"), default=["uniform", "owl"],
                        help="uniform and/or OWL layer sparsities")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    bench, path, results = open_table(args.preset, args.out, "quality")
    dense = results["dense"]
    done = {(r["method"], r["layer_sparsity"], r["setting"]): r for r in results["runs"]}
    print(f"dense: {dense:.3f}\n")
    print("Each cell: perplexity (prune time, peak RSS of the pruning phases)\n")
    print(f"| method | {' | '.join(args.settings)} |")
    print(f"|---|{'---|' * len(args.settings)}", flush=True)
    for method in args.methods:
        for layers in args.layers:
            cells = []
            for setting in args.settings:
                if layers == "owl" and setting == "2:4":  # N:M fixes every block's ratio
                    cells.append("-")
                    continue
                run = done.get((method, layers, setting))
                if run is None:
                    run = {"method": method, "layer_sparsity": layers, "setting": setting,
                           **bench.run(method, layer_sparsity=layers, **SETTINGS[setting])}
                    results["runs"].append(run)
                    path.write_text(json.dumps(results, indent=1))
                cells.append(f"{run['ppl']:.3f} ({run['seconds']:.0f} s, {run['peak_rss_bytes'] / 2**30:.2f} GiB)")
            label = method + (" + owl" if layers == "owl" else "")
            print(f"| {label} | {' | '.join(cells)} |", flush=True)
    plot(results, args.out / f"quality-{args.preset}.png", bench.preset["model"].name)


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install -e .[bench] for matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    lines = dict.fromkeys((r["method"], r["layer_sparsity"]) for r in results["runs"])
    for method, layers in lines:
        points = [(0.0, results["dense"])] + [(SETTINGS[r["setting"]]["sparsity_ratio"], r["ppl"])
                                              for r in results["runs"] if (r["method"], r["layer_sparsity"]) ==
                                              (method, layers) and r["setting"] != "2:4"]
        ax.plot(*zip(*sorted(points)), marker="o", linestyle="--" if layers == "owl" else "-",
                color=f"C{METHODS.index(method) % 10}",  # one colour per method; OWL dashed beside it
                label=method + (" + owl" if layers == "owl" else ""))
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{title}: perplexity vs sparsity (dashed: OWL)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
