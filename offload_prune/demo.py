"""Small random checkpoints built locally, with a byte-level tokenizer and text, so the whole flow
runs without network: `python -m offload_prune.demo FOLDER` (what `make prune` does with no MODEL)."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if (args.folder / "config.json").exists():
        print(f"demo model already at {args.folder}")
        return
    make_checkpoint(args.folder, num_layers=args.layers, max_shard_size="500KB")
    print(f"demo model (random Llama, {args.layers} layers, byte tokenizer) written to {args.folder}")


if __name__ == "__main__":
    main()
