"""NeuronRank TF-IDF settings swept at 50 % against Wanda, on the real models in ../shared/assets.

    python bench/neuronrank_sweep.py --preset stories260k
    python bench/neuronrank_sweep.py --preset smollm2 --quantiles 0.6 --then-quantiles 0.4 0.8

--nr-score input scores |W_ij| * ||X_j|| * IDF_j^gamma per output row (gamma = 0 is Wanda);
--nr-score neuron is the seeds' definition (TF * IDF of each neuron, one threshold per module).
Every gamma and mode runs at the first quantiles; the best gamma of each mode is then re-run at
--then-quantiles. Writes neuronrank-sweep-<preset>.json after every run; settings already in
that file are not run again (delete it to start over).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality import PRESETS, Bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="stories260k")
    parser.add_argument("--gammas", nargs="+", type=float, default=[-1.0, -0.5, -0.25, 0.25, 0.5, 1.0])
    parser.add_argument("--modes", nargs="+", default=["doc", "topic"])
    parser.add_argument("--quantiles", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    parser.add_argument("--then-quantiles", nargs="*", type=float, default=[])
    parser.add_argument("--neuron-score", action="store_true", help="also the seeds' neuron score at gamma = 1")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    bench = Bench(args.preset, args.out)
    print(bench.describe() + "\n")
    path = args.out / f"neuronrank-sweep-{args.preset}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {(r["method"], r.get("mode"), r.get("score"), r.get("gamma"), r.get("q_active")): r for r in runs}
    wanda = done.get(("wanda", None, None, None, None))
    if wanda is None:
        wanda = {"method": "wanda", **bench.run("wanda")}
        runs.append(wanda)
    print(f"wanda (gamma 0): {wanda['ppl']:.3f}\n\n| mode | score | gamma | q_active | perplexity | vs Wanda |\n|---|---|---|---|---|---|")

    def sweep(mode: str, score: str, gamma: float, quantile: float) -> dict:
        run = done.get(("neuronrank_tfidf", mode, score, gamma, quantile))
        if run is None:
            run = {"method": "neuronrank_tfidf", "mode": mode, "score": score, "gamma": gamma, "q_active": quantile,
                   **bench.run("neuronrank_tfidf", nr_tfidf_mode=mode, nr_score=score,
                               **({"nr_input_idf_exp": gamma} if score == "input" else {"idf_exp": gamma}),
                               nr_q_active=quantile)}
            runs.append(run)
            path.write_text(json.dumps({"machine": bench.describe(), "runs": runs}, indent=1))
        print(f"| {mode} | {score} | {gamma:g} | {quantile:g} | {run['ppl']:.3f} | "
              f"{run['ppl'] / wanda['ppl'] - 1:+.1%} |", flush=True)
        return run

    for mode in args.modes:
        for quantile in args.quantiles:
            for gamma in args.gammas:
                sweep(mode, "input", gamma, quantile)
            if args.neuron_score:
                sweep(mode, "neuron", 1.0, quantile)
        best = min((r for r in runs if r.get("mode") == mode and r.get("score") == "input"), key=lambda r: r["ppl"])
        for quantile in args.then_quantiles:
            sweep(mode, "input", best["gamma"], quantile)


if __name__ == "__main__":
    main()
