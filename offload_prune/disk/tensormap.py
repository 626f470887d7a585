"""Checkpoint tensor names <-> the model's parameters, through transformers' own conversion mapping.

transformers 5 does not always load a checkpoint tensor into a parameter of the same name: it
renames (GPT-NeoX `embed_out` -> `lm_head`, Mixtral `block_sparse_moe` -> `mlp`), fuses per-expert
tensors into 3-D parameters, and drops tensors the model does not use (`rotary_emb.inv_freq`).
`get_model_conversion_mapping` returns exactly the transforms `from_pretrained` applies; here they
are applied to one block's tensors at a time, and reversed to write the pruned block back under
the input's own names, shapes and layout.

Each *group* is one transform applied to its source tensors: a plain rename (one tensor -> one
parameter) or a converter (e.g. 2 x 64 per-expert tensors -> one fused parameter). Everything is
checked on meta tensors before any weight is read: every parameter the model needs has a source,
shapes agree with config.json, and the reverse transform gives back the input's names and shapes.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import OffloadPruneError


@dataclass
class Group:
    """One transform from checkpoint tensors (`sources`, in load order) to model parameters."""
    sources: list[str]
    patterns: list[str]                 # the converter's source pattern each source matched
    converter: object | None            # a fresh copy is used per conversion; None: a plain rename
    target: str                         # the first parameter name (what transformers calls layer_name)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)   # parameter -> shape
    reverse_names: dict[str, str] = field(default_factory=dict)        # reverse output name -> source


class TensorMap:
    """How a checkpoint's tensors become `model`'s parameters, and back."""

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(model)  # as from_pretrained applies them (legacy names included)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        prefix = getattr(model, "base_model_prefix", "")
        self.groups: dict[str, Group] = {}
        self.unused: list[str] = []     # checkpoint tensors the model does not load: copied as they are
        self._renamed_unused: dict[str, str] = {}
        for key in sorted(shapes, key=dot_natural_key):
            target, pattern = rename_source_key(key, self._renamings, self._converters, prefix, expected)
            if target not in expected and key in expected:  # as transformers: an exact name wins
                target, pattern = key, None
            if target not in expected:
                self.unused.append(key)
                self._renamed_unused[key] = target
                continue
            group = self.groups.get(target)
            if group is None:
                group = self.groups[target] = Group([], [], by_pattern[pattern] if pattern else None, target)
            elif group.converter is None:
                raise OffloadPruneError(f"checkpoint tensors {group.sources[0]} and {key} both load into {target}")
            group.sources.append(key)
            group.patterns.append(pattern or key)
        self._check(shapes, expected)

    # -- checks, on meta tensors ----------------------------------------------------------------
    def _check(self, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
        for group in self.groups.values():
            meta = {s: torch.empty(shapes[s], device="meta") for s in group.sources}
            params = self._forward(group, meta)
            for name, tensor in params.items():
                if name not in expected:
                    raise OffloadPruneError(f"checkpoint tensor {group.sources[0]} loads into {name}, which "
                                            f"{type(self.model).__name__} does not have")
                if tuple(tensor.shape) != expected[name]:
                    source = group.sources[0] if len(group.sources) == 1 else f"{group.sources[0]} (and others)"
                    raise OffloadPruneError(f"checkpoint tensor {source} has shape {list(shapes[group.sources[0]])}, "
                                            f"but config.json makes {name} {list(expected[name])}")
                group.params[name] = tuple(tensor.shape)
            back = self._reverse_raw(group, params)
            if sorted(back) != sorted(group.sources) and group.converter is not None:
                back = self._match_reverse_names(group, back)
            for name, tensor in back.items():
                if name not in group.sources or tuple(tensor.shape) != shapes[name]:
                    raise OffloadPruneError(f"cannot write {group.sources[0]} back in the input's layout: "
                                            f"transformers' reverse conversion gives {name}")
        self.group_of: dict[str, Group] = {p: g for g in self.groups.values() for p in g.params}
        loaded = set(self.group_of)
        needed = [n for n, p in self.model.named_parameters() if p is not None]  # tied duplicates listed once
        # Parameters transformers ties to another one (a tied head) are not stored; they share their source.
        self.tied = {t: s for t, s in getattr(self.model, "all_tied_weights_keys", {}).items()
                     if t not in loaded and s in loaded}
        self.tied_group = Group([], [], None, "", params={t: () for t in self.tied})
        missing = [n for n in needed if n not in loaded and n not in self.tied]
        if missing:
            raise OffloadPruneError(f"checkpoint has no tensor for {missing[0]}, which {type(self.model).__name__} "
                                    f"needs ({len(missing)} missing)")

    def _match_reverse_names(self, group: Group, back: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A converter's reverse gives names in the renamed space; map them to the sources they came from."""
        from transformers.core_model_loading import apply_renamings
        by_renamed = {_strip(apply_renamings(s, self._renamings), self.model): s for s in group.sources}
        matched = {}
        for name, tensor in back.items():
            source = by_renamed.get(_strip(name, self.model))
            matched[source or name] = tensor
            if source:
                group.reverse_names[name] = source
        return matched

    # -- conversion ------------------------------------------------------------------------------
    def _forward(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if group.converter is None:
            return {group.target: tensors[group.sources[0]]}
        converter = copy.deepcopy(group.converter)
        for source, pattern in zip(group.sources, group.patterns):
            converter.add_tensor(group.target, source, pattern, tensors[source])
        out = converter.convert(group.target, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def _reverse_raw(self, group: Group, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if group.converter is None:
            return {group.sources[0]: params[group.target]}
        from transformers.core_model_loading import apply_converters
        reverse = group.converter.reverse_transform()
        layer_name = None
        for name, tensor in params.items():  # as transformers' revert_weight_conversion does
            renamed, pattern = apply_converters(name, [reverse])
            layer_name = layer_name or renamed
            reverse.add_tensor(renamed, name, pattern, tensor)
        out = reverse.convert(layer_name, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def to_params(self, groups: list[Group], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (all sources of `groups`) -> the parameters they load into."""
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            out.update(self._forward(group, tensors))
        return out

    def to_checkpoint(self, groups: list[Group], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters -> tensors under the checkpoint's own names (dtype left to the caller)."""
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            back = self._reverse_raw(group, {n: params[n] for n in group.params})
            out.update({group.reverse_names.get(name, name): tensor for name, tensor in back.items()})
        return out

    # -- where tensors belong --------------------------------------------------------------------
    def groups_under(self, prefix: str) -> list[Group]:
        return [g for g in self.groups.values() if all(p.startswith(prefix) for p in g.params)]

    def unused_under(self, prefix: str) -> list[str]:
        """Unused checkpoint tensors whose (renamed) name places them under `prefix`."""
        return [k for k in self.unused if self._renamed_unused[k].startswith(prefix) or k.startswith(prefix)]


def _strip(name: str, model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return re.sub(f"^{re.escape(prefix)}\\.", "", name) if prefix else name
