"""offload-prune against llm-compressor's `oneshot`, side by side on the same work.

    python bench/peer.py --setup        # once: the peer's own venv (torch CPU + llmcompressor), never a dependency
    python bench/peer.py                # SmolLM2-135M, Wanda and SparseGPT at 50 % and 2:4, 32 x 512 windows

The same model in float32 on the CPU, the same calibration windows token for token (made here with
offload-prune's sampler from the same text and seed, handed to llm-compressor as a dataset of token ids;
the run's own fingerprint is checked against them), each run alone in a fresh process under
`/usr/bin/time -v`: wall time, the core phase (offload-prune's capture + prune phases from report.json;
llm-compressor's `oneshot` call), peak RSS, and the perplexity of both outputs by one evaluator
(offload-prune's streamed perplexity on the same evaluation windows). Results: OUT/peer.json and a
table on stdout.
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

from memory import machine

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SMOLLM2 = Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m"))
PEER_VENV = Path(os.environ.get("OFFLOAD_PRUNE_PEER_VENV", Path.home() / ".cache/offload-prune-peer-venv"))
PEER_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]
#: offload-prune's --sparsity_type and llm-compressor's mask_structure for each kind of sparsity.
KINDS = {"50%": ("unstructured", "0:0"), "2:4": ("2:4", "2:4")}
GIB = 2**30


def setup(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for package in PEER_PACKAGES:  # torch first: the CPU build, not the CUDA one a bare dependency pulls
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", package], check=True)


def timed(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one process under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    peak_kib = next(int(line.split(":")[1]) for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return wall, peak_kib * 1024, done.stdout


def ours(args, method: str, kind: str, windows_sha: str) -> dict:
    save = args.workdir / f"offload-prune-{method}-{kind.replace(':', 'of').replace('%', '')}"
    wall, peak, _ = timed([sys.executable, "-m", "offload_prune", "--model", str(args.model), "--prune_method", method,
                           "--sparsity_ratio", "0.5", "--sparsity_type", KINDS[kind][0], "--calib-data",
                           str(args.calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                           "--seed", "0", "--device", "cpu", "--dtype", "float32", "--save", str(save),
                           "--overwrite", "--quiet", *args.prune_args.split()])
    report = json.loads((save / "report.json").read_text())
    manifest = json.loads((save / ".offload-prune-run" / "manifest.json").read_text())
    if manifest["fingerprint"]["calibration_sha256"] != windows_sha:
        raise SystemExit("offload-prune calibrated on other windows than llm-compressor: not the same work")
    seconds = report["seconds"]
    return {"save": str(save), "wall": wall, "core": seconds.get("capture", 0) + seconds["prune"],
            "peak_rss": peak, "phases": seconds}


def peer(args, method: str, kind: str, windows_file: Path) -> dict:
    save = args.workdir / f"llm-compressor-{method}-{kind.replace(':', 'of').replace('%', '')}"
    wall, peak, out = timed([str(args.peer_venv / "bin" / "python"), str(Path(__file__).with_name("peer_oneshot.py")),
                             "--model", str(args.model), "--windows", str(windows_file), "--method", method,
                             "--sparsity", "0.5", "--structure", KINDS[kind][1], "--out", str(save)])
    return {"save": str(save), "wall": wall, "core": json.loads(out.strip().splitlines()[-1])["core_seconds"],
            "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="make the peer's venv and exit")
    parser.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--calib", type=Path, default=ASSETS / "data" / "wikitext2_valid_tokens.txt")
    parser.add_argument("--eval", type=Path, default=ASSETS / "data" / "wikitext2_test.txt")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--tools", nargs="+", choices=["offload-prune", "llm-compressor"],
                        default=["offload-prune", "llm-compressor"])
    parser.add_argument("--prune-args", default="", help="more offload-prune flags, e.g. '--micro-batch-size 4'")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "offload-prune-peer")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    if args.setup:
        setup(args.peer_venv)
        return
    if "llm-compressor" in args.tools and not (args.peer_venv / "bin" / "python").exists():
        raise SystemExit(f"no peer venv at {args.peer_venv}: run `python bench/peer.py --setup` first")
    import offload_prune
    from offload_prune.data.calibration import calibration_windows
    from offload_prune.model.loading import load_tokenizer

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    windows, _ = calibration_windows(str(args.calib), load_tokenizer(args.model), args.nsamples, args.seqlen, 0)
    windows_file = args.workdir / "windows.pt"
    torch.save(windows, windows_file)
    windows_sha = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    print(f"machine: {machine()}\nmodel {args.model.name}, float32 on the CPU, {args.nsamples} x {args.seqlen} "
          f"calibration windows (sha256 {windows_sha[:12]}), perplexity on {args.eval_windows} x {args.eval_seqlen} "
          f"tokens of {args.eval.name}\n", flush=True)
    results_file = args.out / "peer.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for method in args.methods:
        for kind in args.kinds:
            for tool in args.tools:
                key = f"{tool} {method} {kind}"
                run = ours(args, method, kind, windows_sha) if tool == "offload-prune" else \
                    peer(args, method, kind, windows_file)
                run["ppl"] = offload_prune.perplexity(run["save"], args.eval, seqlen=args.eval_seqlen,
                                                      max_windows=args.eval_windows)["ppl"]
                results[key] = {**run, "prune_args": args.prune_args if tool == "offload-prune" else ""}
                results_file.write_text(json.dumps(results, indent=1))
                print(f"{key}: wall {run['wall']:.1f} s, core {run['core']:.1f} s, peak RSS "
                      f"{run['peak_rss'] / GIB:.2f} GiB, perplexity {run['ppl']:.3f}", flush=True)
    print(table(results, args.methods, args.kinds))


def table(results: dict, methods: list[str], kinds: list[str]) -> str:
    lines = ["| method | offload-prune wall / core / RSS / ppl | llm-compressor wall / core / RSS / ppl | wall ratio | RSS ratio |",
             "|---|---|---|---|---|"]
    for method in methods:
        for kind in kinds:
            ours_, peer_ = results.get(f"offload-prune {method} {kind}"), results.get(f"llm-compressor {method} {kind}")
            cell = lambda r: (f"{r['wall']:.1f} s / {r['core']:.1f} s / {r['peak_rss'] / GIB:.2f} GiB / {r['ppl']:.3f}"  # noqa: E731
                              if r else "-")
            ratio = lambda key: f"{ours_[key] / peer_[key]:.2f}" if ours_ and peer_ else "-"  # noqa: E731
            lines.append(f"| {method} {kind} | {cell(ours_)} | {cell(peer_)} | {ratio('wall')} | {ratio('peak_rss')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
