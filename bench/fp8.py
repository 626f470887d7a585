"""FP8 in, FP8 out: what re-quantizing a pruned model to block-scaled FP8 costs, against writing it in bfloat16.

    python bench/fp8.py          # SmolLM2-135M converted to FP8 with 64 x 64 block scales (576 = 9 x 64)

SmolLM2's block weights are quantized to float8_e4m3 with one scale per 64 x 64 tile (DeepSeek-V3 uses 128;
SmolLM2's width 576 is not a multiple of it), as DeepSeek-V3 ships them; that checkpoint is pruned with
Wanda 50 % on 32 x 512 WikiText-2 validation windows and written back twice: as FP8 with fresh scales (the
default) and as bfloat16 (`--output-dtype bfloat16`). Perplexity on WikiText-2 test (the first 40 windows of
512 tokens, streamed), size on disk, and the re-quantization error of the pruned weights. Results:
OUT/fp8-smollm2.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from memory import machine

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
SMOLLM2 = Path(os.environ.get("SMOLLM2", Path.home() / ".cache/offload-prune-assets/smollm2-135m"))
BLOCK = 64


def convert(source: Path, target: Path) -> None:
    """`source` with every 2-D block weight as block-scaled FP8 (the package's own quantizer)."""
    from offload_prune.disk.fp8 import BlockFP8Weights
    fp8 = BlockFP8Weights({"weight_block_size": [BLOCK, BLOCK]}, {}, {}, torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix == ".safetensors":
            out = {}
            for name, tensor in load_file(path).items():
                if ".layers." in name and tensor.dim() == 2:
                    out[name], out[name[:-len("weight")] + "weight_scale_inv"] = fp8.quantize(tensor)
                else:
                    out[name] = tensor.to(torch.bfloat16)
            save_file(out, target / path.name, metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            config.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                 "activation_scheme": "dynamic",
                                                                 "weight_block_size": [BLOCK, BLOCK]})
            (target / path.name).write_text(json.dumps(config, indent=2))
        elif path.is_file():
            (target / path.name).write_bytes(path.read_bytes())


def perplexity(model: Path, text: Path) -> float:
    from offload_prune import perplexity as streamed
    return streamed(model, text, seqlen=512, max_windows=40, device="cpu", dtype="float32")["ppl"]


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "offload-prune-bench-fp8")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    calib, text = ASSETS / "data" / "tinystories_valid_sample.txt", ASSETS / "data" / "wikitext2_test.txt"
    fp8_input = args.workdir / "smollm2-fp8"
    if not (fp8_input / "config.json").is_file():
        convert(SMOLLM2, fp8_input)
    rows = {"dense (the original, float16)": None, "dense as fp8": fp8_input}
    for name, extra in (("wanda 50%, written as fp8", []), ("wanda 50%, written as bf16", ["--output-dtype", "bfloat16"])):
        save = args.workdir / name.split(", ")[1].replace(" ", "-")
        subprocess.run([sys.executable, "-m", "offload_prune", "--model", str(fp8_input), "--save", str(save),
                        "--overwrite", "--prune_method", "wanda", "--calib-data", str(calib), "--nsamples", "32",
                        "--seqlen", "512", "--device", "cpu", "--quiet", *extra], check=True)
        rows[name] = save
    original = perplexity(SMOLLM2, text)
    results = {}
    for name, folder in rows.items():
        results[name] = {"ppl": original if folder is None else perplexity(folder, text),
                         "bytes": size(SMOLLM2 if folder is None else folder)}
    written, reference = load_all(rows["wanda 50%, written as fp8"]), load_all(rows["wanda 50%, written as bf16"])
    errors = []
    from offload_prune.disk.checkpoint import CheckpointReader
    dense = CheckpointReader(str(rows["wanda 50%, written as fp8"]))
    for name in [n for n, t in written.items() if t.dtype == torch.float8_e4m3fn]:
        got, want = dense.read([name])[name].float(), reference[name].float()
        errors.append(float((got - want).norm() / want.norm()))
    print(f"SmolLM2-135M as block-scaled FP8 ({BLOCK}x{BLOCK}) on {machine()}; WikiText-2 test, 40 x 512 tokens")
    print(f"{'model':<36} {'perplexity':>10} {'safetensors MiB':>16}")
    for name, row in results.items():
        print(f"{name:<36} {row['ppl']:>10.3f} {row['bytes'] / 2**20:>16.1f}")
    print(f"re-quantization error of the pruned weights, ||fp8 - bf16|| / ||bf16|| per matrix: "
          f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} over {len(errors)} matrices")
    args.out.mkdir(exist_ok=True)
    (args.out / "fp8-smollm2.json").write_text(json.dumps({"machine": machine(), "block": BLOCK, "rows": results,
                                                           "relative_errors": errors}, indent=1))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


if __name__ == "__main__":
    main()
