"""The dtype a reconstruction's forward and backward passes compute in (--recon-dtype).

`bfloat16`: the matrix products of the training steps run under autocast in bfloat16; the masters, the
gradients' sums, Adam's state and the loss stay float32, and the check that decides whether the trained
weights are kept computes in the block's own dtype. `auto` takes bfloat16 where the device has it in
hardware (a GPU that supports it; a CPU with AVX512-BF16 or AMX: measured on SmolLM2, docs/benchmarks.md),
float32 elsewhere, where bfloat16 products are emulated and slower than float32 ones.
"""
from __future__ import annotations

import torch


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def training_dtype(asked: str, device: torch.device) -> str:
    """`asked` (--recon-dtype) resolved for `device`: float32 or bfloat16."""
    if asked != "auto":
        return asked
    return "bfloat16" if native_bfloat16(device) else "float32"
