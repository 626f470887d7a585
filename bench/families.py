"""The family table of the README: each family's tiny random checkpoint (tests/families.py) pruned
streamed, and compared with whole-model pruning of the same checkpoint (tests/reference.py).

    python bench/families.py           # ~1 min on 2 cores

Dense families use Wanda; Mixture-of-Experts ones magnitude, which the whole-model reference can
do without routed statistics (those are checked in tests/test_families.py). Sparsity is over every
weight matrix of the blocks, routers (kept dense) included.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import FAMILIES, build_family  # noqa: E402
from reference import prune_in_memory  # noqa: E402

from memory import machine  # noqa: E402


def main() -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload_prune.data.calibration import load_text, sample_windows, tokenize
    from offload_prune.config import PruneConfig
    from offload_prune.stream.pipeline import prune

    print(f"machine: {machine()}, transformers {transformers.__version__}\n")
    print("| family | model class | runs | weight matrices | sparsity, all block weights | routers (dense) | "
          "streamed = whole-model |")
    print("|---|---|---|---|---|---|---|")
    for family, (_, layers_path, routers) in FAMILIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_family(Path(tmp) / "in", family)
            method = "magnitude" if routers else "wanda"
            try:
                report = prune(PruneConfig(model=str(folder), save=Path(tmp) / "out", prune_method=method,
                                           calib_data=str(folder / "demo.txt"), nsamples=4, seqlen=32, quiet=True))
            except Exception as exc:  # the table says what failed
                print(f"| {family} | | no: {type(exc).__name__}: {str(exc)[:80]} | | | | |")
                continue
            windows = sample_windows(tokenize(AutoTokenizer.from_pretrained(folder), load_text(str(folder / "demo.txt"))),
                                     4, 32, 0)
            reference = prune_in_memory(folder, windows, method, 0.5, None, layers_path, routers).state_dict()
            reloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32)
            equal = all(torch.equal(t, reference[n]) for n, t in reloaded.state_dict().items())
            total = report["totals"]["all"]
            router = report["totals"].get("router", {}).get("modules", 0)
            print(f"| {family} | {type(reloaded).__name__} | yes ({method}) | {total['modules']} | "
                  f"{total['sparsity']:.2%} | {router} | {'bit-exact' if equal else 'DIFFERS'} |")


if __name__ == "__main__":
    main()
