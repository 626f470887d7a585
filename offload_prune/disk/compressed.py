"""A compressed-tensors pack-quantized checkpoint (what `--quantize` writes, and llm-compressor) read as
the dense tensors its modules load: each quantized Linear's parts (`weight_packed`, `weight_scale`,
`weight_shape`, `weight_zero_point`) stand for one `weight`, dequantized by the library's own
decompressor when it is read, in the dtype of its scales. Everything else is read as stored."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import OffloadPruneError

PACKED = "weight_packed"
PARTS = (PACKED, "weight_scale", "weight_shape", "weight_zero_point")
INSTALL_HINT = "pip install 'offload-prune[quant]'"


def quantization_section(model_config, method: str) -> dict | None:
    """The checkpoint's `quantization_config` when its quant_method is `method`, else None."""
    found = getattr(model_config, "quantization_config", None)
    if found is None:
        return None
    found = found if isinstance(found, dict) else found.to_dict()
    return found if found.get("quant_method") == method else None


def quantization_config(model_config) -> dict | None:
    """The checkpoint's compressed-tensors `quantization_config`, or None for a dense checkpoint."""
    return quantization_section(model_config, "compressed-tensors")


class ConvertedWeights:
    """Weights stored as parts, each read as one dense weight: `parts` maps a dense name to {part: stored name}."""

    parts: dict[str, dict[str, str]]

    def stored_names(self, names: list[str]) -> list[str]:
        """What to read from the shards for `names`."""
        return [stored for name in names for stored in (self.parts[name].values() if name in self.parts else [name])]

    def dense(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """`names` from the stored `tensors` read for them, each converted weight made dense."""
        return {name: self.convert({part: tensors[stored] for part, stored in self.parts[name].items()})
                if name in self.parts else tensors[name] for name in names}

    def convert(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class PackedWeights(ConvertedWeights):
    """The dense `weight` names a pack-quantized checkpoint stands for, and how to make them."""

    def __init__(self, config: dict, stored: dict[str, tuple[int, ...]], read_stored: Callable):
        if config.get("format") != "pack-quantized":
            raise OffloadPruneError(f"compressed-tensors format {config.get('format')!r} is not read; "
                                    "pack-quantized is")
        try:
            from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError:
            raise OffloadPruneError(f"this checkpoint is compressed-tensors pack-quantized; reading it needs that "
                                    f"package: {INSTALL_HINT}") from None
        groups = list(QuantizationConfig.model_validate(config).config_groups.values())
        if len(groups) != 1:
            raise OffloadPruneError(f"compressed-tensors checkpoints with {len(groups)} quantization schemes are not "
                                    "read; one scheme for every quantized layer is")
        self.scheme, self.compressor = groups[0], PackedQuantizationCompressor
        prefixes = [name[:-len(PACKED)] for name in stored if name.endswith(PACKED)]
        #: dense name -> {part: stored name}
        self.parts = {prefix + "weight": {part: prefix + part for part in PARTS if prefix + part in stored}
                      for prefix in prefixes}
        shapes = read_stored([parts["weight_shape"] for parts in self.parts.values()])
        self.shapes = {name: tuple(int(d) for d in shapes[parts["weight_shape"]]) for name, parts in self.parts.items()}

    def convert(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compressor.decompress(parts, self.scheme)["weight"]
