"""The memory a task evaluation needs: the eval phase of the memory plan (memory.py), with the requests'
windows as its activation cache and its longest window as the micro-batch, and where that cache goes.
"""
from __future__ import annotations

from typing import Callable, Iterable

import psutil
import torch

from ..basics import format_bytes
from ..config import OffloadPruneError, PruneConfig
from .memory import PROCESS_BASELINE_BYTES, STORE_WORDS, memory_plan


def evaluation_plan(model_config, device_type: str, dtype: str, store: str, windows: int, padded_tokens: int,
                    longest: int, micro_batch_size: int, process_bytes: int = PROCESS_BASELINE_BYTES,
                    shard_dtypes: Iterable[torch.dtype] = (), expert_group_size: int | None = None) -> dict:
    """Device and host peaks of scoring `windows` windows of `padded_tokens` tokens in all (the longest
    `longest`), `micro_batch_size` x `longest` tokens per forward call, the cache in `store` (ram or disk),
    routed experts `expert_group_size` at a time when given."""
    options = PruneConfig(model="", seqlen=max(1, longest), nsamples=1, micro_batch_size=micro_batch_size,
                          offload_activations=store, dtype=dtype, expert_group_size=expert_group_size or "auto")
    full = memory_plan(options, model_config, device_type, eval_windows=max(1, windows), process_bytes=process_bytes,
                       shard_dtypes=shard_dtypes, eval_tokens=padded_tokens)
    phase = full["phases"]["eval"]
    cache = padded_tokens * model_config.hidden_size * getattr(torch, full["compute_dtype"]).itemsize
    return {"device_type": device_type, "compute_dtype": full["compute_dtype"], "activation_store": store,
            "request_cache_bytes": cache, "windows": windows, "padded_tokens": padded_tokens, "longest": longest,
            "device": {"phase": "eval", **phase["device_parts"]}, "host": {"phase": "eval", **phase["host_parts"]}}


def choose_store(requested: str, plan_for: Callable[[str], dict], max_host_memory: int | None) -> dict:
    """The plan with the request cache where `requested` puts it; auto: in RAM when that plan fits the host
    (--max-host-memory, or what the process holds plus 90 % of what the system has available), else on disk.
    A budget that even the disk plan exceeds is refused, naming the smallest that would do."""
    if requested not in ("auto", "ram", "disk"):
        raise OffloadPruneError(f"the evaluation keeps its request cache in ram or on disk, not {requested!r}")
    if requested != "auto":
        plan = plan_for(requested)
    else:
        plan = plan_for("ram")
        limit = max_host_memory or plan["host"]["process"] + int(0.9 * psutil.virtual_memory().available)
        if plan["host"]["peak"] > limit:
            plan = plan_for("disk")
    if max_host_memory is not None and plan["host"]["peak"] > max_host_memory:
        raise OffloadPruneError(f"the evaluation plan needs {format_bytes(plan['host']['peak'])} of host memory "
                                f"(request cache {format_bytes(plan['request_cache_bytes'])} "
                                f"{STORE_WORDS[plan['activation_store']]}), over "
                                f"--max-host-memory {format_bytes(max_host_memory)}; try fewer tasks or --limit")
    return plan
