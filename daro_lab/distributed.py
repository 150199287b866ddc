"""Data-parallel training under torchrun: one process per GPU (NCCL), or per CPU slot (gloo).

    torchrun --nproc_per_node 8 $(which daro-lab) train --config experiments/paper/daro-qwen2.5-math-1.5b.toml

How a step is split (every rank runs the same loop, docs/math.md holds for the global batch):

    prompts   every rank draws the same N prompts and generates K responses for its contiguous slice;
              the rollouts and rewards are all-gathered, so every rank holds the whole batch and
              computes the same kept prompts and advantages (LIPO's batch std included)
    update    each mini-batch's prompts are split over the ranks; the loss's normalisers (tokens per
              group, responses, L_mu) are all-reduced before the loss (`Totals.combine` over a `Shard`) and
              passed to it as data, so each rank's loss is its exact share of the mini-batch's, and the
              metric sums likewise (`MetricSums.combine`); DDP averages the policy gradient, hence each
              rank backpropagates world_size x its share; DARO's weights get the global L_mu as their
              signal on every rank and take identical steps (checked at every checkpoint)
    eval      every rank evaluates its share of the held-out problems and benchmarks; results are gathered
    rank 0    logs to MLflow and writes checkpoints; the other ranks wait at the next collective

The policy is wrapped in torch DDP through a module whose forward is the whole log-prob computation,
so the shared-prompt KV-cache path and the chunked head (several inner forwards) are one DDP forward.
`trainer.parallel = "fsdp"` shards the policy with FSDP2 instead of replicating it: see `fsdp.py`.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from daro_lab.algorithms import Shard


def split_range(n: int, world_size: int, rank: int) -> slice:
    """The contiguous part of range(n) that `rank` of `world_size` holds (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a single process otherwise.

    Backend: gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA is available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # rank 0 writes checkpoints and MLflow records while the others wait at the next collective: allow
        # that more than torch's default (10 min for NCCL), DARO_LAB_DIST_TIMEOUT_MIN minutes (default 60)
        timeout = datetime.timedelta(minutes=float(os.environ.get("DARO_LAB_DIST_TIMEOUT_MIN", "60")))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        # torch warns (and gloo may abort at exit under FSDP) when the group is left for the interpreter to tear
        # down; `shutdown` leaves it in step at the end of a run, this is the fallback of the other exits
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def shutdown(d: DistInfo) -> None:
    """Leave the process group together: a barrier first, so that no rank tears down its connections while
    another (rank 0, finishing its MLflow records) still uses them, then destroy it."""
    import torch.distributed as dist

    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """x summed ('sum') or maxed ('max') over the ranks, as a new detached tensor."""
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return y


def loss_shard(d: DistInfo) -> Shard:
    return Shard(d.world_size, all_reduce) if d.enabled else Shard()


def split(n: int, d: DistInfo) -> slice:
    """This rank's contiguous part of n items (the first n % world ranks get one more)."""
    return split_range(n, d.world_size, d.rank)


def gather_objects(obj: Any, d: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; pickled through CPU (gloo) tensors."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(d.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()]))
    width = max(int(s) for s in sizes)
    bufs = [torch.empty(width, dtype=torch.uint8) for _ in range(d.world_size)]
    dist.all_gather(bufs, torch.nn.functional.pad(data, (0, width - data.numel())))
    return [pickle.loads(b[: int(s)].numpy().tobytes()) for b, s in zip(bufs, sizes)]


def broadcast_object(obj: Any, d: DistInfo) -> Any:
    """Rank 0's obj on every rank."""
    return gather_objects(obj if d.is_main else None, d)[0]


def check_in_sync(modules: list[torch.nn.Module], d: DistInfo) -> None:
    """Raise if the parameters differ between ranks (a data-parallel bug, never expected)."""
    if not d.enabled or not modules:
        return
    device = next(modules[0].parameters()).device
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()]).to(device)
    hi, neg_lo = all_reduce(sums, "max"), all_reduce(-sums, "max")
    bad = torch.nonzero(hi != -neg_lo).flatten()
    if len(bad):
        names = [n for m in modules for n, _ in m.named_parameters()]
        raise RuntimeError(
            f"data-parallel replicas diverged on rank {d.rank}: {len(bad)} parameters differ "
            f"between ranks, first {names[int(bad[0])]!r}"
        )


class LogprobModule(torch.nn.Module):
    """The policy's log-prob computation as one module, so that DDP sees it as one forward."""

    def __init__(self, policy: torch.nn.Module, fn):
        super().__init__()
        self.policy = policy
        self.fn = fn

    def forward(self, *args, **kwargs) -> Tensor:
        return self.fn(self.policy, *args, **kwargs)


def wrap_ddp(policy: torch.nn.Module, fn, d: DistInfo) -> torch.nn.Module:
    """DDP around `fn(policy, ...)`: gradients of the policy averaged over ranks during backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(policy.parameters()).device
    return DDP(
        LogprobModule(policy, fn), device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
