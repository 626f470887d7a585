"""Train one pruned block's kept weights back towards a dense target, the mask held fixed (block-local
reconstruction: Wanda++'s regional optimisation, "A Free Lunch in LLM Compression"'s local reconstruction).

Each unit of the block (units.py) trains in turn (its products in bfloat16 where precision.py says so).
Its trained parameters get float32 master copies,
optimised for --recon-steps steps with Adam (or SGD with momentum), the learning rate on a cosine from
--recon-lr to zero. A step takes the next --recon-batch windows of a seeded shuffle of all the calibration
windows (a new shuffle every pass over them); each rank runs those it holds, in micro-batches, and the
gradients are summed over the ranks before the step, so the ranks take the steps one process would.
The loss is the mean squared error between the unit's output and its target:
- the block: the block's output against the target buffer (targets.py);
- a sub-layer, `dense-block` target: its output against the dense sub-layer's output on the same inputs
  (the inputs come from the sub-layers already reconstructed);
- a sub-layer, `dense-stream` target: the block's output against the dense stream, only this sub-layer
  trained.
A weight the mask removed has its gradient zeroed and is zeroed again after each step: pruned weights stay
exactly zero, N:M stays N:M, and shrunk matrices keep their shapes (those are the shapes trained).

The block itself is not changed while it trains: forward passes read the masters through
`torch.func.functional_call`. At the end the block's output error on all the calibration windows is
measured with the masters cast to the block's dtype (what would be written): only if it is finite and
lower than before reconstruction are they copied in. A non-finite loss abandons that unit's training.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.func import functional_call

from ..config import PruneConfig
from ..runtime.distributed import Ranks
from ..runtime.hostmem import heap_for_temporaries
from .precision import training_dtype
from .units import WHOLE_BLOCK, unit_parameters


class _Stop(Exception):
    """Raised by a hook once the unit's output is made: what follows it in the block is not needed."""


def cast_floating(value, dtype: torch.dtype):
    """Every floating tensor in a (nested) argument structure cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def window_batches(count: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """The windows (indices into all `count` of them) of each step: consecutive slices of seeded shuffles,
    a new shuffle for each pass, a step never spanning two passes (the last of a pass may be shorter)."""
    batches: list[list[int]] = []
    generator = torch.Generator().manual_seed(seed)
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator).tolist()
        batches += [order[start:start + batch] for start in range(0, count, batch)]
    return batches[:steps]


class _Trainer:
    """One block's reconstruction: its inputs and target, and the unit being trained."""

    def __init__(self, block: nn.Module, kwargs: dict, inputs: torch.Tensor, target: torch.Tensor,
                 config: PruneConfig, device: torch.device, ranks: Ranks, first_window: int, windows: int):
        self.block, self.inputs, self.target, self.config, self.device, self.ranks = (
            block, inputs, target, config, device, ranks)
        self.first_window, self.windows = first_window, windows  # this rank's first window; all ranks' count
        self.dtype = next(block.parameters()).dtype
        self.kwargs = send_to_device(kwargs, device)
        self.kwargs32 = cast_floating(self.kwargs, torch.float32)
        self.live = {name: p.detach() for name, p in block.named_parameters()}
        self.bfloat16_products = training_dtype(config.recon_dtype, device) == "bfloat16"
        # Summed over the elements of a step's windows on every rank: ranks and one process agree.
        self.window_elements = inputs[0].numel()

    # -- one unit ----------------------------------------------------------------------------
    def train_unit(self, unit: str, names: list[str], overrides: dict[str, torch.Tensor], later: set[str],
                   dense: dict[str, torch.Tensor] | None, steps_seed: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Train `names` (the unit's parameters); `overrides`: the float32 weights of the units trained
        before; `later`: parameters of units after this one, which a sub-layer's own loss never runs.
        Returns the trained masters, and what to report."""
        config = self.config
        masters = {n: self.live[n].float().clone().requires_grad_(True) for n in names}
        frozen = {n: t if n in later else t.float() for n, t in self.live.items() if n not in masters}
        frozen.update(overrides)
        if config.recon_optimizer == "adam":
            optimizer = torch.optim.Adam(list(masters.values()), lr=config.recon_lr, foreach=False)
        else:
            optimizer = torch.optim.SGD(list(masters.values()), lr=config.recon_lr, momentum=0.9, foreach=False)
        loss_of = self._loss_function(unit, dense)
        batches = window_batches(self.windows, min(config.recon_batch, self.windows), config.recon_steps, steps_seed)
        losses: list[float] = []
        for step, batch in enumerate(batches):
            mine = [w - self.first_window for w in batch if 0 <= w - self.first_window < self.inputs.shape[0]]
            elements = len(batch) * self.window_elements
            total = torch.zeros((), device=self.device)
            for start in range(0, len(mine), config.micro_batch_size):
                rows = mine[start:start + config.micro_batch_size]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16_products):
                    loss = loss_of({**frozen, **masters}, rows) / elements
                loss.backward()
                total += loss.detach()
            for name, master in masters.items():
                if master.grad is None:  # this rank held none of the step's windows
                    master.grad = torch.zeros_like(master)
                self.ranks.sum_(master.grad)
                if master.dim() >= 2:
                    master.grad.masked_fill_(self.live[name] == 0, 0)
            loss_value = float(self.ranks.sum_(total))
            if not math.isfinite(loss_value):
                return {}, {"steps": step, "fallback": f"non-finite loss at step {step + 1}"}
            losses.append(loss_value)
            for group in optimizer.param_groups:
                group["lr"] = config.recon_lr * 0.5 * (1 + math.cos(math.pi * step / len(batches)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, master in masters.items():
                    if master.dim() >= 2:
                        master.masked_fill_(self.live[name] == 0, 0)
        return ({n: m.detach() for n, m in masters.items()},
                {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]})

    def _loss_function(self, unit: str, dense: dict[str, torch.Tensor] | None
                       ) -> Callable[[dict[str, torch.Tensor], list[int]], torch.Tensor]:
        """The summed squared error of the unit's output on some of this rank's windows."""
        block = self.block
        if unit == WHOLE_BLOCK or dense is None:  # against the block's target
            def block_loss(params: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
                x = self.inputs[rows].to(self.device, torch.float32)
                y = _first(functional_call(block, params, (x,), self.kwargs32)).float()
                return (y - self.target[rows].to(self.device, torch.float32)).pow(2).sum()
            return block_loss
        module = block.get_submodule(unit)
        prefix = unit + "."
        dense_unit = {n[len(prefix):]: t for n, t in dense.items() if n.startswith(prefix)}

        def sublayer_loss(params: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
            seen: dict = {}

            def take_inputs(_, args, kwargs):
                seen["inputs"] = (args, kwargs)

            def take_output(_, args, kwargs, output):
                seen["output"] = _first(output)
                raise _Stop

            handles = [module.register_forward_pre_hook(take_inputs, with_kwargs=True),
                       module.register_forward_hook(take_output, with_kwargs=True)]
            try:
                functional_call(block, params, (self.inputs[rows].to(self.device, torch.float32),), self.kwargs32)
            except _Stop:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            args, kwargs = seen["inputs"]
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # in the block's own dtype
                wanted = _first(functional_call(module, dense_unit, cast_floating(args, self.dtype),
                                                cast_floating(kwargs, self.dtype))).float()
            return (seen["output"].float() - wanted).pow(2).sum()
        return sublayer_loss

    # -- the whole block -----------------------------------------------------------------------
    @torch.no_grad()
    def relative_error(self, params: dict[str, torch.Tensor] | None = None) -> float:
        """sum |block(x) - target|^2 / sum |target|^2 over every calibration window (of every rank), the
        block computing in its own dtype, with `params` in place of its parameters when given."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, self.inputs.shape[0], self.config.micro_batch_size):
            rows = slice(start, start + self.config.micro_batch_size)
            x = self.inputs[rows].to(self.device)
            y = _first(self.block(x, **self.kwargs) if params is None
                       else functional_call(self.block, params, (x,), self.kwargs)).double()
            t = self.target[rows].to(self.device).double()
            sums[0] += (y - t).pow(2).sum()
            sums[1] += t.pow(2).sum()
        self.ranks.sum_(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float(sums[0])


def reconstruct_block(block: nn.Module, kwargs: dict, inputs: torch.Tensor, target: torch.Tensor,
                      trained: dict[str, nn.Parameter], units: list[str], dense: dict[str, torch.Tensor] | None,
                      config: PruneConfig, device: torch.device, ranks: Ranks, block_index: int,
                      first_window: int = 0, windows: int | None = None) -> dict:
    """Reconstruct the pruned `block` in place (or leave it, if that is not better); returns the report:
    relative output error before and after, steps, seconds, and a fallback reason where there is one.
    `inputs`/`target`: this rank's windows, the first being window `first_window` of `windows` in all.
    `dense`: the block's parameters before pruning, for sub-layers' own targets (None: block targets)."""
    with heap_for_temporaries(device.type == "cpu"):  # a step's many temporaries, from the heap, not mmap
        return _reconstruct(block, kwargs, inputs, target, trained, units, dense, config, device, ranks, block_index,
                            first_window, windows)


def _reconstruct(block: nn.Module, kwargs: dict, inputs: torch.Tensor, target: torch.Tensor,
                 trained: dict[str, nn.Parameter], units: list[str], dense: dict[str, torch.Tensor] | None,
                 config: PruneConfig, device: torch.device, ranks: Ranks, block_index: int,
                 first_window: int, windows: int | None) -> dict:
    started = time.perf_counter()
    trainer = _Trainer(block, kwargs, inputs, target, config, device, ranks, first_window,
                       windows if windows is not None else inputs.shape[0])
    before = trainer.relative_error()
    overrides: dict[str, torch.Tensor] = {}
    report: dict = {"error_before": before, "units": {}}
    for number, unit in enumerate(units):
        names = unit_parameters(unit, trained)
        later = {n for u in units[number + 1:] for n in unit_parameters(u, trained)} if dense is not None else set()
        masters, info = trainer.train_unit(unit, names, overrides, later, dense,
                                           steps_seed=(config.seed * 1_000_003 + block_index) * 31 + number)
        overrides.update(masters)
        report["units"][unit or "block"] = info
    final = {n: t.to(trainer.dtype) for n, t in overrides.items()}
    after = trainer.relative_error({**trainer.live, **final}) if final else before
    improved = math.isfinite(after) and after < before
    if improved:
        with torch.no_grad():
            for name, value in final.items():
                trained[name].copy_(value)
    reasons = [f"{unit}: {info['fallback']}" for unit, info in report["units"].items() if "fallback" in info]
    if not improved:
        reasons.append("output error not finite" if not math.isfinite(after) else
                       "no unit trained" if not final else "not better than before: the pruned weights are kept")
    if reasons:
        report["fallback"] = "; ".join(reasons)
    report.update(error_after=after if improved else before, error_trained=after, kept=improved,
                  seconds=time.perf_counter() - started)
    return report
