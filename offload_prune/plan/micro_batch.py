"""--micro-batch-size auto: how many calibration windows one forward call takes.

On the CPU, 1: SmolLM2's Wanda prune phase took 57.5 / 60.3 / 60.3 s with 1 / 4 / 8 windows per call
(the products already run at the machine's peak with 512 tokens), and larger calls only hold more memory.
On a GPU, the largest power of two up to GPU_TOKENS_PER_CALL tokens whose plan fits the device: a GPU
needs thousands of rows per product to be busy, and beyond that a larger call only takes memory the
activation cache could use. The choice depends on the options and the device's total memory (or
--max-device-memory), never on what happens to be free, so a resumed run chooses the same size and
computes the same bits.
"""
from __future__ import annotations

from typing import Callable

from ..config import PruneConfig

#: Tokens per forward call that fill a GPU's matrix products.
GPU_TOKENS_PER_CALL = 8192


def resolve_micro_batch(config: PruneConfig, plan_for: Callable[[PruneConfig], dict], windows: int,
                        device_type: str, device_total: int | None) -> PruneConfig:
    """The options with --micro-batch-size a number; `plan_for(options)` plans them with the activation
    cache resolved or not (RAM is assumed while it is not), `windows` is how many this process runs."""
    if config.micro_batch_size != "auto":
        return config
    if device_type == "cpu":
        return config.replaced(micro_batch_size=1)
    size = 1
    while size * 2 <= min(windows, max(1, GPU_TOKENS_PER_CALL // config.seqlen)):
        size *= 2
    limit = config.max_device_memory or (int(0.9 * device_total) if device_total else None)
    store = config.offload_activations if config.offload_activations != "auto" else "ram"
    while size > 1 and limit is not None and plan_for(
            config.replaced(micro_batch_size=size, offload_activations=store))["device"]["peak"] > limit:
        size //= 2
    return config.replaced(micro_batch_size=size)
