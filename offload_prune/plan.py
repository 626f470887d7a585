"""The memory a run will need, from config.json alone, before any weight is read.

Compute device: one block's weights in the compute dtype, the method's statistics and peak prune
workspace (the method says), and one micro-batch of block activations.
Host: the Python process itself and the activation cache (RAM mode), plus the largest of the
phases that follow one another: capturing layer-0 inputs (the embedding), loading a block (its
stored tensors), pruning it, writing it (stored tensors and their serialised copy). When the
compute device is the CPU, whatever the device part holds in a phase is host memory too.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import OffloadPruneError, PruneConfig
from .methods import build_method
from .skeleton import build_skeleton

#: RSS of the Python process with torch and transformers imported, measured on CPU (report.json of
#: tiny runs: 0.37-0.40 GiB); rounded up.
PROCESS_BASELINE_BYTES = int(0.5 * 2**30)


def stored_dtype(model_config) -> torch.dtype:
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def planned_compute_dtype(config: PruneConfig, device_type: str, model_config) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.float32 if device_type == "cpu" else stored_dtype(model_config)


def micro_batch_bytes(config: PruneConfig, model_config, itemsize: int) -> int:
    """Activations inside one block for one micro-batch: residual, norm, q/k/v/attention output and
    MLP intermediates, plus one attention score matrix (what a non-fused attention materialises)."""
    hidden, intermediate = model_config.hidden_size, getattr(model_config, "intermediate_size", 4 * model_config.hidden_size)
    tokens = config.micro_batch_size * config.seqlen
    scores = config.micro_batch_size * model_config.num_attention_heads * config.seqlen ** 2
    return (tokens * (6 * hidden + 3 * intermediate) + scores) * itemsize


def memory_plan(config: PruneConfig, model_config, device_type: str) -> dict:
    model, _, layers = build_skeleton(model_config)
    block = layers[0]
    compute = planned_compute_dtype(config, device_type, model_config)
    stored = stored_dtype(model_config)
    block_numel = sum(p.numel() for p in block.parameters())
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    method = build_method(config).memory_bytes(linears, compute)
    activations = config.nsamples * config.seqlen * model_config.hidden_size * compute.itemsize
    embedding_numel = model.get_input_embeddings().weight.numel()

    device = {
        "block_weights": block_numel * compute.itemsize,
        "method_peak": max(method["statistics"], method["prune"]),
        "micro_batch": micro_batch_bytes(config, model_config, compute.itemsize),
    }
    device["peak"] = sum(device.values())
    on_cpu = device_type == "cpu"
    stored_block = block_numel * stored.itemsize
    phases = {
        "capture": embedding_numel * (compute.itemsize if on_cpu else stored.itemsize),
        "load": stored_block + (device["block_weights"] if on_cpu else 0),
        "prune": device["peak"] if on_cpu else 0,
        "write": 2 * stored_block + (device["block_weights"] if on_cpu else 0),
    }
    largest = max(phases, key=phases.get)
    host = {
        "process": PROCESS_BASELINE_BYTES,
        "activation_cache": activations if config.offload_activations == "ram" else 0,
        f"{largest}_phase": phases[largest],
    }
    host["peak"] = sum(host.values())
    return {"device_type": device_type, "compute_dtype": str(compute).replace("torch.", ""),
            "stored_dtype": str(stored).replace("torch.", ""), "num_layers": len(layers),
            "method": dict(method), "host_phases": phases, "activation_cache_bytes": activations,
            "device": device, "host": host}


def check_budget(plan: dict, config: PruneConfig) -> None:
    for where, limit in (("device", config.max_device_memory), ("host", config.max_host_memory)):
        if limit is not None and plan[where]["peak"] > limit:
            biggest = max((k for k in plan[where] if k != "peak"), key=lambda k: plan[where][k])
            raise OffloadPruneError(
                f"the plan needs {_gib(plan[where]['peak'])} of {where} memory, over --max-{where}-memory "
                f"{_gib(limit)} (largest part: {biggest} {_gib(plan[where][biggest])}); "
                + ("try --offload-activations disk or fewer --nsamples" if where == "host"
                   else "try --true-sequential, a smaller --micro-batch-size or --seqlen"))


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def format_plan(plan: dict, model: str) -> str:
    lines = [f"memory plan for {model}: {plan['num_layers']} blocks, compute on {plan['device_type']} in "
             f"{plan['compute_dtype']} (stored {plan['stored_dtype']})"]
    for where in ("device", "host"):
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in plan[where].items() if k != "peak")
        lines.append(f"  {where:<6} peak {_gib(plan[where]['peak']):>10}  ({parts})")
    return "\n".join(lines)


def load_config_only(model: str):
    """config.json of a local folder or a hub id, and nothing else."""
    from pathlib import Path

    from transformers import AutoConfig
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        from huggingface_hub import hf_hub_download
        return AutoConfig.from_pretrained(Path(hf_hub_download(model, "config.json")).parent)
    except Exception as exc:
        raise OffloadPruneError(f"--model {model}: no readable config.json ({str(exc).splitlines()[0]})") from None
