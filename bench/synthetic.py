"""Synthetic checkpoints for the benchmarks: random fp16 weights written shard by shard, so a
checkpoint larger than memory can be built, with a byte tokenizer and text for calibration."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def build_checkpoint(folder: Path, config, shard_bytes: int = 1 << 30) -> int:
    """Writes `config`'s model with random weights (norms = 1); returns the bytes of weights."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from offload_prune.demo import byte_tokenizer, demo_text

    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
        # The hub's layout (what save_pretrained writes): per-expert tensors for most MoE models.
        shapes = {n: t.shape for n, t in revert_weight_conversion(model, model.state_dict()).items()}
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        if "norm" in name:
            tensor = torch.ones(shape, dtype=torch.float16)
        else:
            tensor = (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).half()
        current[name] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "demo.txt").write_text(demo_text(paragraphs=200))
    return total
