"""Several processes pruning one model (`torchrun --nproc_per_node N -m offload_prune ...`).

Each rank owns a contiguous slice of the calibration windows and caches only their activations, so
activation memory is divided by the number of ranks. Every rank streams the same block. The
statistics methods collect are sums over tokens (Hessians, squared input norms, token and outlier
counts): all-reduced, they are what one process would have summed, up to the order of the sums.
The per-matrix solves are dealt out among the ranks and each pruned matrix is broadcast from the
rank that solved it, so every rank propagates its windows through the same pruned block.

Rank 0 alone writes the output and the manifest. Every rank's activation files lie in the run
folder beside it (on a filesystem all ranks share, when they are on several machines) and the
manifest names them all, so a distributed run resumes, after a crash of any rank, like any other.

One process without torchrun is `Ranks()`: every operation here is then the identity.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..config import OffloadPruneError

#: A block's solves can take long on one rank while the others wait in a collective.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)

T = TypeVar("T")


class Ranks:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, bound: torch.device | None = None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        # The GPU this rank computes on and stages its collectives on (None: one process, or CPUs).
        self.bound = bound

    @classmethod
    def from_environment(cls, device: torch.device) -> "Ranks":
        """The ranks torchrun started (its WORLD_SIZE, RANK, LOCAL_RANK and rendezvous variables), joined
        over NCCL on GPUs and gloo on CPUs; one process otherwise. On GPUs each rank is bound to its own
        before the process group exists: NCCL's object collectives stage their tensors on the current
        device, which is cuda:0 on every rank until it is set ("Duplicate GPU detected", or a hang)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        bound = rank_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
        if not dist.is_initialized():
            if bound.type == "cuda":
                torch.cuda.set_device(bound)
                dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=bound)
            else:
                dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, bound if bound.type == "cuda" else None)

    def device(self, device: torch.device) -> torch.device:
        """The device this rank computes on: its own GPU under torchrun, else `device`."""
        return self.bound if self.bound is not None else device

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes the output, the manifest and the report."""
        return self.rank == 0

    def tag(self) -> str:
        """What tells this rank's run files from the others' ('' in one process)."""
        return "" if self.world == 1 else f".rank{self.rank}"

    def windows(self, count: int) -> slice:
        """This rank's share of `count` calibration windows: contiguous, sizes differing by at most one."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def sum_counts(self, counts: dict[str, int], names: list[str]) -> dict[str, int]:
        """Integer counts by name, summed over the ranks; a name a rank never counted counts 0 there."""
        if self.world == 1:
            return dict(counts)
        totals = self.sum_(torch.tensor([counts.get(n, 0) for n in names], dtype=torch.int64,
                                        device=self._collective_device()))
        return dict(zip(names, totals.tolist()))

    def sum_named(self, sums: dict[str, torch.Tensor], names: list[str],
                  empty: Callable[[str], torch.Tensor]) -> None:
        """Each `sums[name]` summed over the ranks, in place; a name this rank never summed (an expert no
        token of its windows was routed to) takes part from `empty(name)`, zeros of its shape."""
        if self.world == 1:
            return
        for name in names:
            if name not in sums:
                sums[name] = empty(name)
            self.sum_(sums[name])

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), by rank, on every rank."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def gather_tensors(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape and dtype on every rank), by rank, on every rank."""
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    def from_lead(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def deal(self, units: list[list[str]], cost: Callable[[str], int]) -> list[int]:
        """The rank that solves each unit (a list of matrices solved together): the costliest units
        first, each to the rank with the least work so far. The same on every rank."""
        costs = [sum(cost(name) for name in unit) for unit in units]
        owners = [0] * len(units)
        load = [0] * self.world
        for index in sorted(range(len(units)), key=lambda i: -costs[i]):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            owners[index] = owner
            load[owner] += costs[index]
        return owners

    def share(self, tensor: torch.Tensor, owner: int) -> None:
        """Copy `owner`'s values of `tensor` (any view, on the compute device) into everyone's."""
        if self.world == 1:
            return
        buffer = tensor.detach().contiguous()
        dist.broadcast(buffer, src=owner)
        if self.rank != owner and buffer.data_ptr() != tensor.data_ptr():
            tensor.detach().copy_(buffer)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        # NCCL moves only GPU tensors, each rank's on its own GPU; gloo only CPU ones.
        return self.bound if self.bound is not None else torch.device("cpu")


def rank_device(device: torch.device, local_rank: int, local_world: int) -> torch.device:
    """The device of rank `local_rank` of the `local_world` ranks on this machine: for `cuda`, GPU
    LOCAL_RANK; a GPU named by its index only when it is this machine's only rank (two ranks on one GPU
    would stop NCCL)."""
    if device.type != "cuda":
        return device
    if device.index is None:
        return torch.device("cuda", local_rank)
    if local_world > 1:
        raise OffloadPruneError(f"--device {device} names one GPU for the {local_world} torchrun ranks on this "
                                f"machine: give --device cuda, and each rank computes on GPU LOCAL_RANK")
    return device
