"""Perplexity of every method at 50 %, 2:4 and 70 % on the real models in ../shared/assets.

    python bench/quality.py --preset stories260k     # TinyStories model on TinyStories text (~1 min)
    python bench/quality.py --preset smollm2         # SmolLM2-135M on WikiText-2 (build it first with
                                                     # ../shared/assets/get_smollm2.sh; ~45 min on 2 cores)

Calibration: random windows of the calibration text (seed 0); evaluation: non-overlapping
windows of the evaluation text, as SparseGPT/Wanda compute WikiText-2 perplexity. NeuronRank
exponents are the defaults (1, 1, 1). Writes quality-<preset>.json and .png (matplotlib, the
`bench` extra) beside the printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

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
METHODS = [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("neuronrank_old", {}),
           ("neuronrank_tfidf", {"nr_tfidf_mode": "doc"}), ("neuronrank_tfidf", {"nr_tfidf_mode": "topic"}),
           ("hybrid", {})]
SETTINGS = [("50%", {"sparsity_ratio": 0.5}), ("2:4", {"sparsity_type": "2:4"}), ("70%", {"sparsity_ratio": 0.7})]


def label(method: str, extra: dict) -> str:
    return f"{method} ({extra['nr_tfidf_mode']})" if "nr_tfidf_mode" in extra else method


def main() -> None:
    from offload_prune.checkpoint import CheckpointReader
    from offload_prune.config import PruneConfig
    from offload_prune.evaluate import evaluation_windows, perplexity
    from offload_prune.pipeline import load_tokenizer, prune

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="stories260k")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if not (preset["model"] / "config.json").exists():
        raise SystemExit(f"{preset['model']} not found (see ../shared/assets/README.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cpu"), torch.float32
    if preset.get("split_half"):
        stories = preset["calib"].read_text().split("\n\n")
        half = len(stories) // 2
        for part, chunk in (("calib", stories[:half]), ("eval", stories[half:])):
            path = args.out / f"{args.preset}-{part}.txt"
            path.write_text("\n\n".join(chunk))
            preset = {**preset, part: path}

    eval_ids = evaluation_windows(str(preset["eval"]), load_tokenizer(preset["model"]), preset["eval_seqlen"],
                                  preset["eval_max_windows"])

    def ppl(folder: Path) -> float:
        return perplexity(CheckpointReader(str(folder)), eval_ids, device, dtype, quiet=True)["ppl"]

    print(f"machine: {machine()}")
    print(f"{preset['model'].name}: calibration {preset['nsamples']} x {preset['seqlen']} tokens of "
          f"{preset['calib'].name} (seed 0); perplexity on {preset['eval'].name}, {preset['eval_seqlen']}-token windows"
          + (f", first {preset['eval_max_windows']}" if preset["eval_max_windows"] else ", all") + "\n")
    dense = ppl(preset["model"])
    results = {"dense": dense, "runs": []}
    print(f"| method | {' | '.join(s for s, _ in SETTINGS)} |")
    print(f"|---|{'---|' * len(SETTINGS)}")
    print(f"| dense | {' | '.join(f'{dense:.3f}' for _ in SETTINGS)} |", flush=True)
    for method, extra in METHODS:
        cells = []
        for setting, options in SETTINGS:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                prune(PruneConfig(model=str(preset["model"]), save=Path(tmp) / "out", prune_method=method,
                                  calib_data=str(preset["calib"]), nsamples=preset["nsamples"], seqlen=preset["seqlen"],
                                  quiet=True, **extra, **options))
                value = ppl(Path(tmp) / "out")
            results["runs"].append({"method": label(method, extra), "setting": setting, "ppl": value,
                                    "seconds": time.perf_counter() - start})
            cells.append(f"{value:.3f}")
        print(f"| {label(method, extra)} | {' | '.join(cells)} |", flush=True)
    (args.out / f"quality-{args.preset}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"quality-{args.preset}.png", preset["model"].name)


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install -e .[bench] for matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        points = [(0.0, results["dense"])] + [(0.5 if r["setting"] != "70%" else 0.7, r["ppl"])
                                              for r in results["runs"] if r["method"] == method and r["setting"] != "2:4"]
        ax.plot(*zip(*sorted(points)), marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{title}: perplexity vs sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
