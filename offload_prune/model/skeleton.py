"""The model as a meta-device skeleton that gets real tensors one block at a time.

The model's own forward does everything architecture-specific (embedding scaling, causal and
sliding-window masks, rotary tables, final norm, logit soft-capping): decoder layers are swapped
for small stand-ins that record what each layer receives, or inject hidden states we computed.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, Iterator

import torch
from accelerate import init_empty_weights
from accelerate.utils import send_to_device, set_module_tensor_to_device
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..config import OffloadPruneError
from ..disk.checkpoint import CheckpointReader
from ..disk.tensormap import TensorMap
from ..runtime.activations import may_copy_asynchronously
from ..runtime.hostmem import heap_for_temporaries
from ..runtime.overlap import ReadAhead
from .matrices import BlockStopped, is_experts


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: keeps the keyword arguments it is called with."""

    def __init__(self, index: int, sink: "StreamedModel", last: bool, layer: nn.Module):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last
        # Positional arguments after the hidden states (GPT-2 passes the mask so) are kept by name.
        self.names = list(inspect.signature(layer.forward).parameters)[1:]

    def forward(self, hidden_states, *args, **kwargs):
        if len(args) > len(self.names):
            raise OffloadPruneError("decoder layers called with more positional arguments than they declare")
        self.sink._record(self.index, hidden_states, {**dict(zip(self.names, args)), **kwargs})
        if self.last:
            raise _StopForward
        return hidden_states


class _Inject(nn.Module):
    """Stands in for the first decoder layer: returns the given final hidden states instead."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


class _Passthrough(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _LargeEmptyOnMeta(TorchFunctionMode):
    """`torch.empty` of at least `MIN_BYTES` makes a meta tensor. Modules allocate their parameters with it before
    init_empty_weights moves them to meta: one experts parameter of DeepSeek-V3 (256 x 4096 x 7168) is a 30 GB
    allocation, refused outright on a 24 GB machine. Buffers computed in __init__ (rotary tables) are small and
    stay real."""

    MIN_BYTES = 256 << 20

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            numel = 1
            for size in shape:
                numel *= int(size)
            if numel * (kwargs.get("dtype") or torch.get_default_dtype()).itemsize >= self.MIN_BYTES:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_skeleton(model_config) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model on the meta device (no memory for weights), and its decoder layer list."""
    try:
        with init_empty_weights(), _LargeEmptyOnMeta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(model_config)
    except ValueError as exc:
        raise OffloadPruneError(f"unsupported architecture {type(model_config).__name__}: "
                                f"{str(exc).splitlines()[0]}") from None
    if any(is_experts(module) for module in model.modules()):
        # The stream computes experts with transformers' eager loop (expert_groups.py says why).
        model.set_experts_implementation("eager")
    n = getattr(model.config, "num_hidden_layers", None)
    # The decoder layers: the list of num_hidden_layers modules holding most of the weights
    # (model.layers, transformer.h, gpt_neox.layers, model.decoder.layers, ...).
    lists = [(sum(p.numel() for p in module.parameters()), name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n]
    if not lists:
        raise OffloadPruneError(f"unsupported architecture {type(model).__name__}: no list of its {n} decoder "
                                "layers; only decoder-only causal LMs are supported")
    _, name, module = max(lists, key=lambda item: item[0])
    return model.eval(), name, module


class StreamedModel:
    """A causal LM whose weights stay on disk until a step needs them."""

    def __init__(self, reader: CheckpointReader, device: torch.device, dtype: torch.dtype, read_ahead: bool = False):
        self.reader, self.device, self.dtype = reader, device, dtype
        # Loading block i starts reading block i+1's tensors on a helper thread (one block's stored bytes).
        self._ahead = ReadAhead(reader.read, read_ahead)
        self.model, self.layers_path, self.layers = build_skeleton(reader.config)
        self.num_layers = len(self.layers)
        self.base = getattr(self.model, self.model.base_model_prefix)
        # Buffers (rotary tables) are real even inside init_empty_weights; they go where compute happens.
        for name, _ in list(self.model.named_buffers()):
            set_module_tensor_to_device(self.model, name, device)
        self.tensormap = TensorMap(self.model, reader.shapes)
        for target, source in self.tensormap.tied.items():
            if target.startswith(self.layers_path + ".") or source.startswith(self.layers_path + "."):
                raise OffloadPruneError(f"{type(self.model).__name__} shares {target} with {source} (weights shared "
                                        "across layers): its blocks cannot be loaded and pruned one at a time")
        self._block_groups = [self.tensormap.groups_under(self.block_prefix(i)) for i in range(self.num_layers)]
        in_blocks = {id(g) for groups in self._block_groups for g in groups}
        self._outside_groups = [g for g in self.tensormap.groups.values() if id(g) not in in_blocks]
        in_block_names = {n for i in range(self.num_layers) for n in self.block_names(i)}
        self.outside_names = [n for n in reader.weight_map if n not in in_block_names]
        self._head_groups = self._head_groups_of()
        self._recorded: dict[int, dict] = {}
        self._layer0_inputs: list[torch.Tensor] = []
        self._held_back: dict[int, set[int]] = {}  # block -> ids of groups left on disk (experts streamed apart)

    # -- structure -------------------------------------------------------------------------
    def _head_groups_of(self) -> list:
        """Tensors only the logits need: the output projection (the final norm is small and loads with
        the embedding)."""
        output = self.model.get_output_embeddings()
        heads = tuple(name + "." for name, module in self.model.named_modules() if module is output)
        return [g for g in self._outside_groups if heads and all(p.startswith(heads) for p in g.params)]

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def checkpoint_name(self, param: str) -> str | None:
        """The checkpoint tensor a parameter is loaded from by a plain rename (None: fused, or absent)."""
        group = self.tensormap.groups.get(param)
        return group.sources[0] if group is not None and group.converter is None else None

    def max_positions(self) -> int | None:
        """Positions a model with a learned position table can encode: an embedding outside the blocks
        other than the token embedding (GPT-2's wpe, OPT's table with its offset). None for rotary or
        ALiBi models, which take longer windows (at their own risk of quality)."""
        tokens = self.model.get_input_embeddings()
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Embedding) and module is not tokens and not name.startswith(self.layers_path):
                return module.num_embeddings - getattr(module, "offset", 0)
        return None

    def block_names(self, index: int) -> list[str]:
        """The block's checkpoint tensors: those loading into its parameters, and unused ones under its name."""
        sources = [s for g in self._block_groups[index] for s in g.sources]
        return sources + self.tensormap.unused_under(self.block_prefix(index))

    # -- materialising ---------------------------------------------------------------------
    def _materialise(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            dtype = self.dtype if value.is_floating_point() else None
            set_module_tensor_to_device(root, name, self.device, value=value, dtype=dtype)

    def load_outside(self, with_head: bool) -> None:
        """Embedding and other tensors outside the blocks; the head only when logits are needed."""
        groups = [g for g in self._outside_groups if with_head or all(g is not h for h in self._head_groups)]
        tensors = self.reader.read([s for g in groups for s in g.sources])
        self._materialise(self.model, self.tensormap.to_params(groups, tensors))
        if with_head:  # tied parameters (a tied head) have no tensor of their own: they share their source
            for target, source in self.tensormap.tied.items():
                module_name, _, leaf = target.rpartition(".")
                if getattr(self.model.get_submodule(module_name), leaf).is_meta:
                    setattr(self.model.get_submodule(module_name), leaf, self.model.get_parameter(source))

    def unload_outside(self) -> None:
        """Back to meta: the embedding is needed only to make layer-0 inputs."""
        for group in [*self._outside_groups, self.tensormap.tied_group]:
            for name in group.params:
                module_name, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                if leaf in module._parameters and not getattr(module, leaf).is_meta:
                    set_module_tensor_to_device(self.model, name, "meta")

    def hold_back(self, index: int, params: list[str]) -> None:
        """Leave these parameters of block `index` on the meta device when it loads, and their tensors out of
        its read-ahead and its written tensors: a block's experts, streamed group by group (expert_groups.py)."""
        self._held_back[index] = {id(self.tensormap.group_of[p]) for p in params}

    def _kept_groups(self, index: int) -> list:
        held = self._held_back.get(index, set())
        return [g for g in self._block_groups[index] if id(g) not in held]

    def _loaded_names(self, index: int) -> list[str]:
        return [s for g in self._kept_groups(index) for s in g.sources]

    def load_block(self, index: int) -> nn.Module:
        block, prefix, groups = self.layers[index], self.block_prefix(index), self._kept_groups(index)
        tensors = self._ahead.take(index, self._loaded_names(index))
        if index + 1 < self.num_layers:
            self._ahead.start(index + 1, self._loaded_names(index + 1))
        for group in groups:  # converted and materialised one group at a time: one fusion's copies alive at once
            params = self.tensormap.to_params([group], {s: tensors.pop(s) for s in group.sources})
            self._materialise(block, {n[len(prefix):]: t for n, t in params.items()})
            del params
        held = {p for g in self._block_groups[index] if g not in groups for p in g.params}
        unloaded = [n for n, p in block.named_parameters() if p.is_meta and prefix + n not in held]
        if unloaded:  # e.g. a parameter of this block loaded from a tensor stored with another one
            raise OffloadPruneError(f"{prefix}{unloaded[0]} has no tensor of its own in block {index} of the "
                                    "checkpoint: this model cannot be streamed block by block")
        return block

    def close(self) -> None:
        """Ends the read-ahead thread (a read in flight finishes first)."""
        self._ahead.close()

    def unload_block(self, index: int) -> None:
        block = self.layers[index]
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
        if self.device.type == "cuda":  # give the freed block back, not only to torch's cache
            torch.cuda.empty_cache()

    def stored_dtype(self, prefix: str, matrix) -> torch.dtype:
        """The dtype a block matrix's checkpoint tensor has (what it is written in)."""
        param = prefix + (matrix.name.rsplit(".", 2)[0] + "." + matrix.name.rsplit(".", 1)[1]
                          if matrix.expert is not None else matrix.name + ".weight")
        return self.reader.dtypes[self.tensormap.group_of[param].sources[0]]

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors under their checkpoint names, in their stored dtypes, on the CPU."""
        block, prefix, groups = self.layers[index], self.block_prefix(index), self._kept_groups(index)
        state = {prefix + n: t.detach() for n, t in block.state_dict().items() if not t.is_meta}
        tensors = self.tensormap.to_checkpoint(groups, state)
        out = {name: tensors[name].to("cpu", self.reader.dtypes[name]) for name in tensors}
        out.update(self.reader.read(self.tensormap.unused_under(prefix)))  # copied as they are
        return out

    # -- forward passes --------------------------------------------------------------------
    @contextlib.contextmanager
    def _layers_replaced(self, replacements: list[nn.Module]) -> Iterator[None]:
        originals = list(self.layers)
        for i, module in enumerate(replacements):
            self.layers[i] = module
        try:
            yield
        finally:
            for i, module in enumerate(originals):
                self.layers[i] = module

    def _record(self, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        if index == 0:
            self._layer0_inputs.append(hidden)
        self._recorded.setdefault(index, kwargs)

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """Layer-0 hidden states for one batch of token windows, and the keyword arguments each
        decoder layer receives (recorded on the first call; they depend only on the window length)."""
        recorders = [_Recorder(i, self, i == self.num_layers - 1, self.layers[i]) for i in range(self.num_layers)]
        self._layer0_inputs = []
        with self._layers_replaced(recorders):
            try:
                self.base(input_ids=input_ids.to(self.device), use_cache=False)
            except _StopForward:
                pass
        hidden = self._layer0_inputs.pop()
        return hidden, [self._recorded[i] for i in range(self.num_layers)]

    def capture_into(self, windows: torch.Tensor, out: torch.Tensor, quiet: bool, desc: str,
                     written: Callable[[slice], None] | None = None) -> list[dict]:
        """Fill `out` with the layer-0 inputs of every window, telling `written` each window filled; return
        each layer's keyword arguments."""
        self._recorded = {}
        layer_kwargs: list[dict] = []
        for i in tqdm(range(len(windows)), desc=desc, disable=quiet, leave=False):
            hidden, layer_kwargs = self.capture(windows[i:i + 1])
            out[i:i + 1] = hidden.to(out.device, out.dtype)
            if written is not None:
                written(slice(i, i + 1))
        return layer_kwargs

    @torch.no_grad()
    def next_token_nll(self, final_hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int) -> float:
        """Sum over positions of the next-token negative log-likelihood of one window."""
        targets = input_ids[0, 1:].to(self.device)
        total = torch.zeros((), device=self.device)  # float32: no float64 on a GPU; one sync per window
        for positions, logits in self.head_logits(final_hidden, input_ids, torch.arange(targets.numel()), chunk):
            total += torch.nn.functional.cross_entropy(logits.float(), targets[positions], reduction="sum")
        return float(total)

    @torch.no_grad()
    def head_logits(self, final_hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                    chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions, their logits) of one window, `chunk` positions at a time, through the model's own head
        (final norm, soft-capping, scaling) on the final hidden states: logits are never made for the whole
        window times the vocabulary (`logits_to_keep`; a model without it makes them once)."""
        stand_ins = [_Inject(final_hidden.to(self.device))] + [_Passthrough() for _ in range(self.num_layers - 1)]
        ids = input_ids.to(self.device)
        positions = positions.to(self.device)
        chunked = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        with self._layers_replaced(stand_ins):
            if not chunked:
                logits = self.model(input_ids=ids, use_cache=False).logits[0]
            for start in range(0, positions.numel(), chunk):
                part = positions[start:start + chunk]
                if chunked:
                    yield part, self.model(input_ids=ids, use_cache=False, logits_to_keep=part).logits[0]
                else:
                    yield part, logits[part]


@torch.no_grad()
def run_windows(layer: nn.Module, kwargs: dict, inputs: torch.Tensor, outputs: torch.Tensor | None,
                micro_batch_size: int, device: torch.device, written: Callable[[slice], None] | None = None) -> None:
    """Run every window through `layer` in micro-batches; keep the results in `outputs` (which
    may be `inputs` itself: each micro-batch is read before it is overwritten) unless None, and tell
    `written` which windows each micro-batch filled."""
    kwargs = send_to_device(kwargs, device)
    # On a GPU the copies are queued on the compute stream (asynchronous from a pinned cache) and the host
    # waits once, at the end: a micro-batch's outputs overwrite its own inputs only after the copy that
    # read them, in stream order.
    queued = outputs is not None and may_copy_asynchronously(outputs)
    with heap_for_temporaries(device.type == "cpu"):
        _run_batches(layer, kwargs, inputs, outputs, micro_batch_size, device, written, queued)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batches(layer: nn.Module, kwargs: dict, inputs: torch.Tensor, outputs: torch.Tensor | None,
                 micro_batch_size: int, device: torch.device, written: Callable[[slice], None] | None,
                 queued: bool) -> None:
    for start in range(0, inputs.shape[0], micro_batch_size):
        batch = slice(start, start + micro_batch_size)
        try:
            out = layer(inputs[batch].to(device, non_blocking=True), **kwargs)
        except BlockStopped:  # statistics only: every observed matrix had its input
            if outputs is not None:
                raise
            continue
        # transformers 5 returns a tensor; 4.x returned a tuple whose first item is the hidden states.
        out = out[0] if isinstance(out, tuple) else out
        if outputs is not None:
            outputs[batch].copy_(out, non_blocking=queued)
            if written is not None:
                written(batch)
