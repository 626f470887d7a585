"""Smaller, faster models: parameters, disk size, forward latency, generation speed and perplexity of
the dense model against each structured setting (ShortGPT block removal, MLP shrink by several neuron
scores, with and without the least-squares refit, a third of the attention key/value groups removed,
and both; each also with --reconstruct block, as `<setting>+recon`), all measured side by side in one
process.

    python bench/structured.py --preset smollm2       # SmolLM2-135M, WikiText-2 perplexity (~25 min on 2 cores)
    python bench/structured.py --preset synthetic1b   # a random 1.1B Llama (TinyLlama's shape): speed and size only
    python bench/structured.py --preset smollm2 --settings dense shortgpt shrink-wanda

Latency: the fastest of --repeats forward passes of one --tokens-token window after a warm-up, with
transformers on the CPU in float32 (or fp16 on a GPU when one is there); generation: greedy
--new-tokens tokens after a 16-token prompt, with the KV cache, tokens per second (fastest round;
every round's time is in the JSON). Pruning
runs first (its time is printed); then, in one fresh process, every model is loaded and they are
timed in rounds, one pass of each per round, so that load on the machine falls on all of them alike.
Results: structured-<preset>.json and a plot in --plots.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import torch

from quality import PRESETS, Bench

SYNTHETIC_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
# What each setting prunes; block counts are a fraction of the model's blocks (6 of SmolLM2's 30).
REMOVED_BLOCK_SHARE = 0.2
MLP_SHRINK = 0.25
HEAD_SHARE = 1 / 3  # of the key/value groups: SmolLM2 keeps 2 of 3 (6 of 9 query heads), the 1.1B 3 of 4
SETTINGS = {
    "dense": None,
    "shortgpt": ("shortgpt", {}),
    "shrink-wanda": ("wanda", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK)),
    "shrink-wanda-norefit": ("wanda", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK,
                                           neuron_refit=False)),
    "shrink-flap": ("flap", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK)),
    "shrink-flap-norefit": ("flap", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK,
                                         neuron_refit=False)),
    "shrink-magnitude": ("magnitude", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK)),
    "shrink-magnitude-norefit": ("magnitude", dict(sparsity_type="structured", shrink=True,
                                                   sparsity_ratio=MLP_SHRINK, neuron_refit=False)),
    "shrink-neuronrank": ("neuronrank_tfidf", dict(sparsity_type="structured", shrink=True,
                                                   sparsity_ratio=MLP_SHRINK)),
    "heads-flap": ("flap", dict(sparsity_type="structured", shrink=True, sparsity_ratio=0.0, prune_heads=HEAD_SHARE)),
    "heads-flap-norefit": ("flap", dict(sparsity_type="structured", shrink=True, sparsity_ratio=0.0,
                                        prune_heads=HEAD_SHARE, neuron_refit=False)),
    "heads-wanda": ("wanda", dict(sparsity_type="structured", shrink=True, sparsity_ratio=0.0,
                                  prune_heads=HEAD_SHARE)),
    "shrink-flap+heads": ("flap", dict(sparsity_type="structured", shrink=True, sparsity_ratio=MLP_SHRINK,
                                       prune_heads=HEAD_SHARE)),
}
# Each structured setting again with block-local reconstruction after it (--reconstruct block, its defaults).
SETTINGS.update({f"{name}+recon": (method, {**options, "reconstruct": "block"})
                 for name, (method, options) in [(n, v) for n, v in SETTINGS.items() if v]})


def synthetic_preset(out: Path) -> dict:
    from transformers import LlamaConfig

    from synthetic import build_checkpoint
    folder = out / "synthetic-1b"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, LlamaConfig(**SYNTHETIC_1B, dtype="float16"))
    return dict(model=folder, calib=folder / "demo.txt", eval=None, nsamples=8, seqlen=256)


def timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def speeds(folders: dict[str, Path], tokens: int, new_tokens: int, repeats: int, device: torch.device) -> dict:
    """Every model loaded at once, then timed in rounds (one forward of each, then the next round), so
    that a disturbance of the machine falls on all of them alike."""
    from transformers import AutoModelForCausalLM
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
              for name, folder in folders.items()}
    vocab = min(m.config.vocab_size for m in models.values())
    window = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = window[:, :16]
    latencies = {name: [] for name in models}
    generations = {name: [] for name in models}
    for model in models.values():  # warm-up
        model(window, use_cache=False)
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for _ in range(repeats):
        for name, model in models.items():
            latencies[name].append(timed(lambda: model(window, use_cache=False), device))
            generations[name].append(timed(lambda: model.generate(prompt, **greedy), device))
    # The fastest of the rounds: on a shared machine every disturbance only adds time.
    return {name: {"params": sum(p.numel() for p in model.parameters()), "latency_s": min(latencies[name]),
                   "tokens_per_s": new_tokens / min(generations[name]), "latencies_s": latencies[name],
                   "generation_s": generations[name]}
            for name, model in models.items()}


def cached_perplexity(bench: Bench, folder: Path, cache_path: Path) -> float | None:
    """Perplexity of a model folder, kept in `cache_path` (by folder and write time) for the next run."""
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{folder.resolve()}@{max(f.stat().st_mtime_ns for f in folder.glob('*.safetensors'))}"
    if key not in cache:
        cache[key] = bench.perplexity(folder)
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[key]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "synthetic1b"], default="smollm2")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the preset's)")
    parser.add_argument("--fresh", action="store_true", help="prune again even where a folder holds the same job")
    parser.add_argument("--tag", default="", help="named results and plot (structured-<preset>-<tag>), so a run "
                        "of some settings does not replace the full table's")
    parser.add_argument("--plots", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    torch.manual_seed(0)
    preset = synthetic_preset(args.out) if args.preset == "synthetic1b" else None
    bench = Bench(args.preset, args.out, preset)
    if args.nsamples:
        bench.preset = {**bench.preset, "nsamples": args.nsamples}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = f", GPU {torch.cuda.get_device_name()} (fp16)" if device.type == "cuda" else ", CPU float32"
    print(bench.describe() + gpu + f"; torch threads {torch.get_num_threads()}\n")
    model = bench.preset["model"]
    from transformers import AutoConfig
    blocks = AutoConfig.from_pretrained(model).num_hidden_layers
    folders, rows = {}, []
    for name in args.settings:  # prune everything first, then time every model in the same conditions
        if SETTINGS[name] is None:
            folders[name], seconds = model, 0.0
        else:
            method, options = SETTINGS[name]
            if method == "shortgpt":
                options = {**options, "remove_layers": str(round(REMOVED_BLOCK_SHARE * blocks))}
            folders[name] = args.out / f"structured-{args.preset}-{name}{f'-n{args.nsamples}' if args.nsamples else ''}"
            # A folder holding this finished job is reused as it is (its report keeps the prune time).
            report = bench.prune(method, folders[name], overwrite=args.fresh, **options)
            seconds = sum(report["seconds"].values())
            print(f"pruned {name} in {seconds:.0f} s", flush=True)
        rows.append({"setting": name, "prune_seconds": seconds})
    # Timed in a fresh process: pruning fixes glibc's mmap threshold (offload_prune/hostmem.py) for the
    # rest of its process, which makes every large activation a fresh mapping and slows inference.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(speeds, (folders, args.tokens, args.new_tokens, args.repeats, device))
    perplexities = args.out / f"structured-{args.preset}-perplexity.json"
    for row in rows:
        folder = folders[row["setting"]]
        row.update(measured[row["setting"]], disk_bytes=disk_bytes(folder),
                   ppl=cached_perplexity(bench, folder, perplexities))
    dense = rows[0] if rows[0]["setting"] == "dense" else None
    print(f"| setting | parameters | disk | forward {args.tokens} tokens | generation | perplexity | prune time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        faster = f" ({dense['latency_s'] / row['latency_s']:.2f}x)" if dense else ""
        quicker = f" ({row['tokens_per_s'] / dense['tokens_per_s']:.2f}x)" if dense else ""
        ppl = f"{row['ppl']:.3f}" if row["ppl"] is not None else "-"
        print(f"| {row['setting']} | {row['params'] / 1e6:.1f} M | {row['disk_bytes'] / 2**20:.1f} MiB | "
              f"{row['latency_s'] * 1000:.0f} ms{faster} | {row['tokens_per_s']:.1f} tok/s{quicker} | {ppl} | "
              f"{row['prune_seconds']:.0f} s |")
    name = f"structured-{args.preset}{f'-{args.tag}' if args.tag else ''}"
    path = args.out / f"{name}{f'-n{args.nsamples}' if args.nsamples else ''}.json"
    path.write_text(json.dumps({"machine": bench.describe() + gpu, "rows": rows}, indent=1))
    plot(rows, args.plots / f"{name}{'-gpu' if device.type == 'cuda' else ''}.png", f"{model.name}{gpu}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install -e .[bench] for matplotlib)")
        return
    names = [r["setting"] for r in rows]
    panels = [("forward latency (ms)", [r["latency_s"] * 1000 for r in rows]),
              ("generation (tokens/s)", [r["tokens_per_s"] for r in rows]),
              ("parameters (M)", [r["params"] / 1e6 for r in rows])]
    if all(r["ppl"] is not None for r in rows):
        panels.append(("perplexity (log scale)", [r["ppl"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2))
    for ax, (label, values) in zip(axes, panels):
        ax.barh(names, values, color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.set_xlabel(label)
        ax.invert_yaxis()
        if label.startswith("perplexity"):
            ax.set_xscale("log")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
