"""Where a run computes, and the tokenizer it reads text with."""
from __future__ import annotations

import torch
from transformers import AutoTokenizer

from ..config import OffloadPruneError


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OffloadPruneError(f"--device {requested}: CUDA is not available here")
    return device


def load_tokenizer(folder):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise OffloadPruneError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
