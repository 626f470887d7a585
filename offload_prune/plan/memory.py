"""The memory a run will need, phase by phase, before any weight is read.

Inputs: config.json (shapes and dtypes, through the meta-device skeleton), the options, the size of
the calibration text and the number of evaluation windows. Every phase the run goes through has
its own line, for the compute device and for the host, with the parts that make it up:

- calibration: the text and its tokenization (measured: 138-228 bytes per byte of text);
- capture:     the embedding (its stored tensor while it is converted), one window's hidden states;
- prune:       the largest of its steps: loading a block (stored and compute copies), collecting
               statistics and pruning (block, the method's statistics and workspace, one
               micro-batch), writing it (block, its stored copy, one tensor being serialized); with
               --overlap-io (default) also the next block's stored tensors being read ahead and the
               previous block's stored copy being written behind;
- influence:   (shortgpt) one block with one micro-batch, in the dense pass;
- copy:        (shortgpt) one kept block's stored tensors, read and written under new names;
- reconstruct: (shortgpt --reconstruct) the influence pass's steps, the copy's, and training a kept block;
- (prune and reconstruct) with --reconstruct, training the block (reconstruct/memory.py: float32 masters,
               gradients, optimiser state, one micro-batch's backward pass) beside its target cache;
- write:       the tensors outside the blocks, one being serialized, the head's prune workspace;
- eval:        the largest of: the embedding step, one block with one micro-batch, and embedding
               and head with the logits of one chunk of positions.

The host always holds the process itself and, with `--offload-activations ram`, the activation
cache; with `device`, the cache is device memory in the phases that hold it (and a host staging
buffer persists it). On the CPU the compute device is the host: device parts are host memory too. The test
suite checks each phase against the peak a run measures (report.json, `phase_peaks`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import psutil
import torch
from torch import nn

from ..basics import format_bytes
from ..config import OffloadPruneError, PruneConfig
from ..disk.checkpoint import CheckpointReader
from ..disk.durable import DIRECT_STAGING_BYTES
from ..disk.fp8 import fp8_config
from ..methods import build_method
from ..model.matrices import describe, find_matrices
from ..model.selection import selected_matrices
from ..model.skeleton import build_skeleton
from ..quantize.checkpoint import quantized_matrices
from ..quantize.memory import quantization_bytes
from ..reconstruct import reconstruction_bytes
from ..runtime.activations import STAGING_BYTES, pinned_bytes
from ..runtime.distributed import Ranks
from ..runtime.masks import chunk_workspace_bytes
from .expert_groups import experts_numel, grouped_prune_steps, held_numel, largest_written

#: RSS of the Python process with torch and transformers imported, measured on CPU (report.json of
#: tiny runs: 0.37-0.40 GiB); rounded up. A run uses its own measured RSS instead.
PROCESS_BASELINE_BYTES = int(0.5 * 2**30)
#: What the process keeps resident once it has computed, beyond its RSS when the run started (the
#: `process` term): library code paged in (BLAS, LAPACK, attention kernels), OpenMP and helper-thread
#: stacks and arenas. Measured +21-30 MiB by the write phase of the Mixture-of-Experts plan test; rounded up.
RUNTIME_GROWTH_BYTES = 32 * 2**20
#: Peak host bytes per byte of text while it is read and tokenized (measured with the SmolLM2 and
#: stories260K tokenizers: 138-163 on WikiText-2, 228 on random base64 text).
TOKENIZE_BYTES_PER_TEXT_BYTE = 220
#: Logits are computed for this many (position x vocabulary) entries at a time.
LOGITS_CHUNK_ELEMENTS = 1 << 22
#: A float32 backward pass keeps about this many times a micro-batch's forward activations
#: (`micro_batch_bytes`): those saved for the backward, and their gradients.
RECON_BACKWARD_FACTOR = 2
PHASES = ("calibration", "capture", "prune", "write", "eval")
#: How the plan's first line says where the activation cache is.
STORE_WORDS = {"ram": "in RAM", "disk": "on disk", "device": "on the device"}


def stored_dtype(model_config, shard_dtypes: Iterable[torch.dtype] = ()) -> torch.dtype:
    """The floating dtype the checkpoint stores: the shards' most common when their headers were read
    (they are what is loaded), else what config.json says."""
    stored = [dtype for dtype in shard_dtypes if dtype.is_floating_point]
    if stored:
        return max(set(stored), key=lambda dtype: (stored.count(dtype), str(dtype)))
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def compute_dtype(requested: str, device_type: str, stored: torch.dtype) -> torch.dtype:
    """The dtype a run computes in, for the run and its plan alike: --dtype, else float32 on the CPU
    (half-precision matmuls there are slow or missing) and the stored dtype on a GPU (pruned values cast
    back to it bit-exactly)."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.float32 if device_type == "cpu" else stored


def pick_dtype(requested: str, device: torch.device, reader: CheckpointReader) -> torch.dtype:
    """The compute dtype, chosen as the memory plan chooses it (plan.compute_dtype)."""
    return compute_dtype(requested, device.type, stored_dtype(reader.config, reader.dtypes.values()))


def micro_batch_bytes(config: PruneConfig, model_config, itemsize: int) -> int:
    """Activations inside one block for one micro-batch: residual, norm, q/k/v/attention output and
    MLP intermediates, plus one attention score matrix (what a non-fused attention materialises)."""
    hidden, intermediate = model_config.hidden_size, getattr(model_config, "intermediate_size", 4 * model_config.hidden_size)
    tokens = config.micro_batch_size * config.seqlen
    scores = config.micro_batch_size * model_config.num_attention_heads * config.seqlen ** 2
    return (tokens * (6 * hidden + 3 * intermediate) + scores) * itemsize


def logits_chunk_positions(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)


def block_kinds(layers) -> list[tuple[nn.Module, int]]:
    """(one block of each kind, the index of the last block of that kind): blocks are of one kind when their
    parameters have the same names and shapes (DeepSeek-V3: three dense blocks, then 58 with 256 experts)."""
    kinds: dict[tuple, tuple[nn.Module, int]] = {}
    for index, block in enumerate(layers):
        key = tuple((name, tuple(p.shape)) for name, p in block.named_parameters())
        kinds[key] = (kinds.get(key, (block, index))[0], index)
    return list(kinds.values())


def kind_steps(config: PruneConfig, model_config, block: nn.Module, matrices: dict, chosen: dict, method: dict,
               compute: torch.dtype, stored: torch.dtype, device_type: str, micro_batch: int, ahead: dict,
               behind: dict, pruning_method=None) -> dict[str, list[tuple[dict, dict]]]:
    """The steps of each phase that holds one block of this kind, as (device parts, host-only parts)."""
    block_numel = sum(p.numel() for p in block.parameters())
    largest_in_block = max(p.numel() for p in block.parameters())
    block_compute, block_stored = block_numel * compute.itemsize, block_numel * stored.itemsize
    # Per-expert tensors fused into a 3-D parameter on load: the stacked and the concatenated copy of
    # the largest one exist together for a moment (transformers' MergeModulelist, then Concatenate).
    fused = any(p.dim() == 3 for p in block.parameters())
    fp8 = fp8_config(model_config) is not None  # read as stored (one byte a weight), then dequantized
    stored_loading = {"stored_block": block_stored, **({"expert_fusion": 2 * largest_in_block * stored.itemsize}
                                                       if fused else {}), **({"fp8_stored": block_numel} if fp8 else {})}
    # One tensor's contiguous copy (of a strided view) and the buffer a shard is written through.
    serialized = largest_in_block * stored.itemsize + DIRECT_STAGING_BYTES
    steps = {
        # OWL's dense pass: a block's input norms while it runs, then its scores one matrix at a time.
        "owl": [({"block_weights": block_compute}, {**stored_loading, **ahead}),
                ({"block_weights": block_compute, "input_norms": sum(m.in_features * 8 for m in chosen.values()),
                  "micro_batch": micro_batch}, ahead),
                ({"block_weights": block_compute,
                  "outlier_scores": 3 * max(m.weight.numel() for m in chosen.values()) * 4}, ahead)],
        # ShortGPT's dense pass: a block and one micro-batch (the influence is a running sum).
        "influence": [({"block_weights": block_compute}, {**stored_loading, **ahead}),
                      ({"block_weights": block_compute, "micro_batch": micro_batch}, ahead)],
        # ShortGPT's output: each kept block's stored tensors read and written under new names.
        "copy": [({}, {"stored_block": block_stored, "serialized_tensor": serialized})],
        "prune": [({"block_weights": block_compute}, {**stored_loading, **ahead, **behind}),  # load
                  ({"block_weights": block_compute, "method_peak": max(method["statistics"], method["prune"]),
                    "micro_batch": micro_batch}, {**ahead, **behind}),  # statistics, prune, propagate
                  ({"block_weights": block_compute},  # write: the stored copy, one tensor serialized at a time
                   {"stored_block": block_stored, "serialized_tensor": serialized, **ahead})],
        "eval": [({"block_weights": block_compute, "micro_batch": micro_batch}, stored_loading)],
    }
    if config.expert_group_size != "auto" and experts_numel(block)[0]:
        steps.update(grouped_prune_steps(config, model_config, block, chosen, pruning_method, compute, stored, fp8,
                                         device_type, micro_batch, ahead, behind))
    if config.reconstruct != "off":
        # A removal's kept blocks: each loaded (a removed one too, for the target) and run, trained, written.
        steps["reconstruct"] = [steps["influence"][0], steps["influence"][1], ({}, steps["copy"][0][1])]
        for recon in reconstruction_bytes(config, block, matrices, compute, RECON_BACKWARD_FACTOR * micro_batch_bytes(
                config, model_config, 4), micro_batch):
            steps["prune"].append(({"block_weights": block_compute, **recon}, {**ahead, **behind}))
            steps["reconstruct"].append(({"block_weights": block_compute, **recon}, ahead))
    if config.quantize != "off":
        steps["prune"].append(({"block_weights": block_compute,
                                **quantization_bytes(config, quantized_matrices(matrices), compute, device_type)},
                               {**ahead, **behind}))
    return steps


def memory_plan(config: PruneConfig, model_config, device_type: str, calibration_text_bytes: int = 0,
                eval_windows: int = 0, process_bytes: int = PROCESS_BASELINE_BYTES,
                shard_dtypes: Iterable[torch.dtype] = (), eval_tokens: int | None = None) -> dict:
    """`eval_tokens`: the evaluation's cached tokens when its windows are not all --seqlen long (a task
    evaluation's requests); else `eval_windows` x --seqlen."""
    model, _, layers = build_skeleton(model_config)
    stored = stored_dtype(model_config, shard_dtypes)
    compute = compute_dtype(config.dtype, device_type, stored)
    on_cpu = device_type == "cpu"
    store = config.offload_activations
    if store not in ("ram", "disk", "device"):
        raise ValueError("plan an activation store that is resolved (resolve_activation_store)")
    if config.micro_batch_size == "auto":
        raise ValueError("plan a micro-batch size that is resolved (resolve_micro_batch)")
    pruning_method = build_method(config, model_config)
    hidden, vocab = model_config.hidden_size, model_config.vocab_size
    cache = config.nsamples * config.seqlen * hidden * compute.itemsize
    eval_cache = (eval_windows * config.seqlen if eval_tokens is None else eval_tokens) * hidden * compute.itemsize
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    head = output.weight.numel() if output is not None else 0
    # Tensors outside the blocks (parameters() counts a tied head once); a pruned tied head is written apart.
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in layers.parameters())
    outside += head if tied and config.nr_prune_lm_head else 0
    micro_batch = micro_batch_bytes(config, model_config, compute.itemsize)
    window = config.seqlen * hidden * compute.itemsize
    kinds = block_kinds(layers)
    # --overlap-io: the next block's stored tensors are read while a block loads and computes, and the
    # previous block's stored copy is still being written while this one loads and collects statistics; either
    # may be of another kind than this one, so the largest kind stands for them.
    group_size = config.expert_group_size if config.expert_group_size != "auto" else None
    largest_stored = max(held_numel(b, group_size) for b, _ in kinds) * stored.itemsize
    largest_serialized = max(largest_written(b, group_size) for b, _ in kinds) * stored.itemsize
    ahead = {"next_block_read": largest_stored} if config.overlap_io else {}
    behind = ({"previous_block_written": largest_stored + largest_serialized + DIRECT_STAGING_BYTES}
              if config.overlap_io else {})
    head_apart = head if not tied or config.nr_prune_lm_head else 0  # a pruned tied head becomes its own tensor
    embed_step = ({"embedding": embedding * compute.itemsize, "window": 4 * window},
                  {"stored_embedding": embedding * stored.itemsize})

    # Per phase, its steps one after another, each as (device parts, host-only parts): the phase's
    # peak is its largest step. The process and the activation caches come on top. Each kind of block
    # adds its own steps (kind_steps), so a phase's peak is its largest kind's.
    phases: dict[str, list[tuple[dict, dict]]] = {
        "calibration": [({}, {"text_and_tokens": calibration_text_bytes * TOKENIZE_BYTES_PER_TEXT_BYTE})],
        "capture": [embed_step], "owl": [], "influence": [], "copy": [], "reconstruct": [], "prune": [],
        "write": [({"head_prune_chunk": chunk_workspace_bytes(head, device_type) if config.nr_prune_lm_head else 0},
                   {"outside_tensors": outside * stored.itemsize,
                    "serialized_tensor": max(embedding, head) * stored.itemsize + DIRECT_STAGING_BYTES})],
        "eval": [embed_step,
                 ({"embedding_and_head": (embedding + head_apart) * compute.itemsize,
                   "logits_chunk": 3 * logits_chunk_positions(vocab) * vocab * 4},
                  {"stored_embedding_and_head": (embedding + head_apart) * stored.itemsize})],
    }
    methods = []
    for block, last_index in kinds:
        matrices = find_matrices(block)
        describe(block, matrices)
        chosen = selected_matrices(matrices, last_index, len(layers), config) or matrices
        method = pruning_method.memory_bytes(chosen, compute, device_type)
        methods.append(method)
        for name, steps in kind_steps(config, model_config, block, matrices, chosen, method, compute, stored,
                                      device_type, micro_batch, ahead, behind, pruning_method).items():
            phases[name].extend(steps)
    method = {key: max(m[key] for m in methods) for key in methods[0]}
    device_plan, host_plan = {}, {}
    for name, steps in phases.items():
        cached = name in ("capture", "owl", "influence", "prune", "reconstruct")
        # The device store's cache is device memory; persisted and reopened through a host staging buffer.
        on_device = {"activation_cache": cache} if store == "device" and cached else {}
        # Host caches are page-locked when a GPU computes, and take their size rounded up to a power of two.
        host_cache = pinned_bytes if device_type == "cuda" else int
        # --reconstruct's targets: a second cache beside the first in the prune phase (the dense block's
        # outputs, or the dense stream's), where the first is; on disk a file, not memory.
        target = cache if config.reconstruct != "off" and name in ("prune", "reconstruct") and store != "disk" else 0
        if target and store == "device":
            on_device["recon_target_cache"] = target
        caches = {"activation_cache": host_cache(cache) if store == "ram" and cached else 0,
                  "recon_target_cache": host_cache(target) if store == "ram" else 0,
                  "activation_staging": host_cache(min(STAGING_BYTES, cache)) if on_device else 0,
                  "eval_cache": host_cache(eval_cache) if store != "disk" and name == "eval" else 0}
        fixed = {"process": process_bytes, "runtime_growth": RUNTIME_GROWTH_BYTES if name != "calibration" else 0,
                 **caches}
        fixed = {k: v for k, v in fixed.items() if v}
        if not steps:  # a phase no kind of block has (reconstruct, unless a removal reconstructs)
            continue
        devices, hosts = [], []
        for device_parts, host_parts in steps:
            device_parts = {k: v for k, v in {**on_device, **device_parts}.items() if v}
            host = {**fixed, **{k: v for k, v in host_parts.items() if v}}
            for key, value in (device_parts.items() if on_cpu else ()):
                host[key] = host.get(key, 0) + value
            devices.append({**device_parts, "peak": sum(device_parts.values())})
            hosts.append({**host, "peak": sum(host.values())})
        device_plan[name] = max(devices, key=lambda parts: parts["peak"])
        host_plan[name] = max(hosts, key=lambda parts: parts["peak"])
    if not eval_windows:
        del device_plan["eval"], host_plan["eval"]
    unused = ["owl"] if config.layer_sparsity != "owl" else []
    unused += ["prune"] if pruning_method.removes_blocks else ["influence", "copy"]
    unused += ["copy" if config.reconstruct != "off" and pruning_method.removes_blocks else "reconstruct"]
    for name in unused:
        device_plan.pop(name, None), host_plan.pop(name, None)
    device_phase = max(device_plan, key=lambda p: device_plan[p]["peak"])
    host_phase = max(host_plan, key=lambda p: host_plan[p]["peak"])
    return {"device_type": device_type, "compute_dtype": str(compute).replace("torch.", ""),
            "stored_dtype": str(stored).replace("torch.", ""), "num_layers": len(layers),
            "method": dict(method), "activation_cache_bytes": cache,
            "largest_experts": max(experts_numel(b)[0] for b, _ in kinds),
            "expert_group_size": config.expert_group_size if config.expert_group_size != "auto" else None, "activation_store": config.offload_activations, "eval_windows": eval_windows,
            "phases": {name: {"device": device_plan[name]["peak"], "host": host_plan[name]["peak"],
                              "device_parts": device_plan[name], "host_parts": host_plan[name]}
                       for name in device_plan},
            "device": {"phase": device_phase, **device_plan[device_phase]},
            "host": {"phase": host_phase, **host_plan[host_phase]}}


def per_rank(config: PruneConfig, ranks: Ranks) -> PruneConfig:
    """The options as one rank plans them: it caches only its share of the calibration windows."""
    share = ranks.windows(config.nsamples)
    return config.replaced(nsamples=share.stop - share.start) if ranks.world > 1 else config


def resolve_activation_store(config: PruneConfig, plan_for: Callable[[PruneConfig], dict],
                             device_free: int | None = None) -> tuple[PruneConfig, dict]:
    """--offload-activations auto: the cache on the GPU when the plan with it there fits the GPU and the
    host, else in RAM when the plan with it there fits the host, else on disk. The GPU's limit is
    --max-device-memory, or else 90 % of its free memory (`device_free`; None: not known, the GPU is not
    tried); the host's, --max-host-memory, or else what the process holds now plus 90 % of the memory
    the system has available. On the CPU the device is the host: RAM. Returns the options with the
    store named, and their plan."""
    if config.offload_activations != "auto":
        return config, plan_for(config)
    in_ram = config.replaced(offload_activations="ram")
    plan = plan_for(in_ram)
    device_limit, limit = budgets(config, plan, device_free)
    if plan["device_type"] != "cpu" and device_limit is not None:
        on_device = config.replaced(offload_activations="device")
        device_plan = plan_for(on_device)
        if device_plan["device"]["peak"] <= device_limit and device_plan["host"]["peak"] <= limit:
            return on_device, device_plan
    if plan["host"]["peak"] <= limit:
        return in_ram, plan
    on_disk = config.replaced(offload_activations="disk")
    return on_disk, plan_for(on_disk)


def budgets(config: PruneConfig, plan: dict, device_free: int | None) -> tuple[int | None, int]:
    """(device limit, host limit) a run chooses its options within: --max-device-memory, or else 90 % of the
    GPU's free memory (None on the CPU, or where it is not known), and --max-host-memory, or else what the
    process holds now plus 90 % of the memory the system has available."""
    host = config.max_host_memory or plan["phases"]["calibration"]["host_parts"]["process"] + int(
        0.9 * psutil.virtual_memory().available)
    if plan["device_type"] == "cpu":
        return None, host
    return config.max_device_memory or (int(0.9 * device_free) if device_free is not None else None), host


def device_free_bytes(device: torch.device) -> int | None:
    """The free memory of the GPU a run computes on; None on the CPU or where no GPU is present."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


def device_total_bytes(device: torch.device) -> int | None:
    """The total memory of the GPU a run computes on; None on the CPU or where no GPU is present."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_budget(plan: dict, config: PruneConfig) -> None:
    for where, limit in (("device", config.max_device_memory), ("host", config.max_host_memory)):
        if limit is not None and plan[where]["peak"] > limit:
            parts = {k: v for k, v in plan[where].items() if k not in ("peak", "phase")}
            biggest = max(parts, key=parts.get)
            raise OffloadPruneError(
                f"the plan needs {format_bytes(plan[where]['peak'])} of {where} memory in its {plan[where]['phase']} phase, "
                f"over --max-{where}-memory {format_bytes(limit)} (largest part: {biggest} {format_bytes(parts[biggest])}); "
                + ("try --offload-activations disk or fewer --nsamples" if where == "host"
                   else "try --reconstruct sublayer, a smaller --micro-batch-size or --seqlen"
                   if config.reconstruct == "block" and biggest.startswith("recon")
                   else "try a smaller --expert-group-size, --micro-batch-size or --seqlen"
                   if biggest.startswith("group") else "try --true-sequential, a smaller --micro-batch-size or --seqlen"))




def format_plan(plan: dict, model: str) -> str:
    lines = [f"memory plan for {model}: {plan['num_layers']} blocks, compute on {plan['device_type']} in "
             f"{plan['compute_dtype']} (stored {plan['stored_dtype']}); calibration activations "
             f"{format_bytes(plan['activation_cache_bytes'])} {STORE_WORDS[plan['activation_store']]}"
             + (f"; routed experts streamed {plan['expert_group_size']} at a time" if plan.get("expert_group_size")
                else "")]
    for where in ("device", "host"):
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in plan[where].items() if k not in ("peak", "phase"))
        lines.append(f"  {where:<6} peak {format_bytes(plan[where]['peak']):>10} in {plan[where]['phase']}  ({parts})")
    lines.append("  by phase: " + ", ".join(f"{name} {format_bytes(p['device'])} / {format_bytes(p['host'])}"
                                            for name, p in plan["phases"].items()) + "  (device / host)")
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
