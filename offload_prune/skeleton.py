"""The model as a meta-device skeleton that gets real tensors one block at a time.

The model's own forward does everything architecture-specific (embedding scaling, causal and
sliding-window masks, rotary tables, final norm, logit soft-capping): decoder layers are swapped
for small stand-ins that record what each layer receives, or inject hidden states we computed.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Iterator

import torch
from accelerate import init_empty_weights
from accelerate.utils import send_to_device, set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from .checkpoint import CheckpointReader
from .config import OffloadPruneError


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: keeps the keyword arguments it is called with."""

    def __init__(self, index: int, sink: "StreamedModel", last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise OffloadPruneError("decoder layers called with positional arguments beyond the hidden "
                                    "states are not supported")
        self.sink._record(self.index, hidden_states, kwargs)
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


def build_skeleton(model_config) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model on the meta device (no memory for weights), and its decoder layer list."""
    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(model_config)
    except ValueError as exc:
        raise OffloadPruneError(f"unsupported architecture {type(model_config).__name__}: "
                                f"{str(exc).splitlines()[0]}") from None
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == n:
            return model.eval(), name, module
    raise OffloadPruneError(f"unsupported architecture {type(model).__name__}: no decoder "
                            "layer list (model.layers); only decoder-only causal LMs are supported")


class StreamedModel:
    """A causal LM whose weights stay on disk until a step needs them."""

    def __init__(self, reader: CheckpointReader, device: torch.device, dtype: torch.dtype):
        self.reader, self.device, self.dtype = reader, device, dtype
        self.model, self.layers_path, self.layers = build_skeleton(reader.config)
        self.num_layers = len(self.layers)
        self.base = getattr(self.model, self.model.base_model_prefix)
        # Buffers (rotary tables) are real even inside init_empty_weights; they go where compute happens.
        for name, _ in list(self.model.named_buffers()):
            set_module_tensor_to_device(self.model, name, device)
        in_blocks = {n for i in range(self.num_layers) for n in self.block_names(i)}
        self.outside_names = [n for n in reader.weight_map if n not in in_blocks]
        self.head_names = self._head_names()
        self._recorded: dict[int, dict] = {}
        self._layer0_inputs: list[torch.Tensor] = []

    # -- structure -------------------------------------------------------------------------
    def _head_names(self) -> list[str]:
        """Tensors only the logits need: the output projection and the final norm."""
        heads = []
        output = self.model.get_output_embeddings()
        for name, module in self.model.named_modules():
            if module is output or (module is getattr(self.base, "norm", None)):
                heads.append(name + ".")
        return [n for n in self.outside_names if n.startswith(tuple(heads))]

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
        prefix = f"{self.layers_path}.{index}."
        return [n for n in self.reader.weight_map if n.startswith(prefix)]

    # -- materialising ---------------------------------------------------------------------
    def _materialise(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            dtype = self.dtype if value.is_floating_point() else None
            set_module_tensor_to_device(root, name, self.device, value=value, dtype=dtype)

    def load_outside(self, with_head: bool) -> None:
        """Embedding and other tensors outside the blocks; the head only when logits are needed."""
        names = [n for n in self.outside_names if with_head or n not in self.head_names]
        self._materialise(self.model, self.reader.read(names))
        output = self.model.get_output_embeddings()
        if with_head and output is not None and output.weight.is_meta:
            # Tied embeddings: the checkpoint holds no lm_head tensor of its own.
            output.weight = self.model.get_input_embeddings().weight

    def unload_outside(self) -> None:
        """Back to meta: the embedding is needed only to make layer-0 inputs."""
        for name in self.outside_names:
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if leaf in module._parameters and not getattr(module, leaf).is_meta:
                set_module_tensor_to_device(self.model, name, "meta")

    def load_block(self, index: int) -> nn.Module:
        block = self.layers[index]
        prefix = f"{self.layers_path}.{index}."
        tensors = {n[len(prefix):]: t for n, t in self.reader.read(self.block_names(index)).items()}
        missing = [n for n, p in block.named_parameters() if n not in tensors]
        if missing:
            raise OffloadPruneError(f"checkpoint has no tensor {prefix}{missing[0]} that "
                                    f"{type(self.model).__name__} needs (renamed or missing weights)")
        self._materialise(block, tensors)
        return block

    def unload_block(self, index: int) -> None:
        block = self.layers[index]
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
        if self.device.type == "cuda":  # give the freed block back, not only to torch's cache
            torch.cuda.empty_cache()

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors under their checkpoint names, in their stored dtypes, on the CPU."""
        block, prefix = self.layers[index], f"{self.layers_path}.{index}."
        state = block.state_dict()
        return {name: state[name[len(prefix):]].detach().to("cpu", self.reader.dtypes[name])
                for name in self.block_names(index)}

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
        recorders = [_Recorder(i, self, i == self.num_layers - 1) for i in range(self.num_layers)]
        self._layer0_inputs = []
        with self._layers_replaced(recorders):
            try:
                self.base(input_ids=input_ids.to(self.device), use_cache=False)
            except _StopForward:
                pass
        hidden = self._layer0_inputs.pop()
        return hidden, [self._recorded[i] for i in range(self.num_layers)]

    def capture_into(self, windows: torch.Tensor, out: torch.Tensor, quiet: bool, desc: str) -> list[dict]:
        """Fill `out` with the layer-0 inputs of every window; return each layer's keyword arguments."""
        self._recorded = {}
        layer_kwargs: list[dict] = []
        for i in tqdm(range(len(windows)), desc=desc, disable=quiet, leave=False):
            hidden, layer_kwargs = self.capture(windows[i:i + 1])
            out[i:i + 1] = hidden.to("cpu", out.dtype)
        return layer_kwargs

    @torch.no_grad()
    def next_token_nll(self, final_hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int) -> float:
        """Sum over positions of the next-token negative log-likelihood of one window, through the
        model's own head (final norm, soft-capping, scaling). Logits are made for `chunk` positions at
        a time (`logits_to_keep`), never for the whole window times the vocabulary."""
        stand_ins = [_Inject(final_hidden.to(self.device))] + [_Passthrough() for _ in range(self.num_layers - 1)]
        ids = input_ids.to(self.device)
        targets = ids[0, 1:]
        chunked = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        total = torch.zeros((), device=self.device)  # float32: no float64 on a GPU; one sync per window
        with self._layers_replaced(stand_ins):
            for start in range(0, targets.numel(), chunk if chunked else targets.numel()):
                positions = torch.arange(start, min(start + chunk, targets.numel()), device=self.device)
                options = {"logits_to_keep": positions} if chunked else {}
                logits = self.model(input_ids=ids, use_cache=False, **options).logits[0]
                logits = logits if chunked else logits[:-1]
                total += torch.nn.functional.cross_entropy(logits.float(), targets[positions], reduction="sum")
        return float(total)


@torch.no_grad()
def run_windows(layer: nn.Module, kwargs: dict, inputs: torch.Tensor, outputs: torch.Tensor | None,
                micro_batch_size: int, device: torch.device) -> None:
    """Run every window through `layer` in micro-batches; keep the results in `outputs` (which
    may be `inputs` itself: each micro-batch is read before it is overwritten) unless None."""
    kwargs = send_to_device(kwargs, device)
    for start in range(0, inputs.shape[0], micro_batch_size):
        batch = slice(start, start + micro_batch_size)
        out = layer(inputs[batch].to(device), **kwargs)
        # transformers 5 returns a tensor; 4.x returned a tuple whose first item is the hidden states.
        out = out[0] if isinstance(out, tuple) else out
        if outputs is not None:
            outputs[batch] = out.to("cpu", outputs.dtype)
