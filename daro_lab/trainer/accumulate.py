"""Gradient accumulation that gives the update of the whole mini-batch: `trainer.micro_batch_prompts`.

A mini-batch too large for one forward/backward is run as M micro-batches (passes) whose gradients add up.
The loss of a pass cannot be computed from the pass alone: its normalisers (tokens per pass-rate group,
responses, the padded width, L_mu for DARO's signal) and its metrics are sums over the whole mini-batch.
They are the same sums that data parallelism all-reduces (`algorithms.Shard`), so the passes are treated as
more shards, in two phases:

    1  every pass's log-probs without grad; `policy_loss` on all M passes side by side (threads), each
       reduction summed (or maxed) over the passes and then over the data-parallel ranks; each reduced value
       is recorded, in call order
    2  each pass again with grad: its loss with `Replay` of the recorded values as the reduction, which makes
       it its exact share of the mini-batch's loss; backward; the gradients accumulate

Phase 1 costs one forward without grad per pass. Forward passes are deterministic, so phase 2 recomputes
the same log-probs; the values it replays are those of phase 1.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

from daro_lab.algorithms import Shard


def reductions(n: int, run: Callable[[int, Shard], Any], outer: Shard) -> tuple[list[list[Tensor]], list[Any]]:
    """Run `run(i, shard)` for the n passes i side by side, where `shard.reduce` combines its argument over
    the n passes and then over the ranks (`outer.reduce`, one collective per call). Returns (each pass's
    reduced values in call order, each pass's return value). Every pass must reduce in the same order."""
    barrier = threading.Barrier(n)
    slots: list[Tensor | None] = [None] * n
    result: list[Tensor | None] = [None]
    records: list[list[Tensor]] = [[] for _ in range(n)]

    def reducer(i: int):
        def reduce(x: Tensor, op: str = "sum") -> Tensor:
            slots[i] = x.detach().clone()
            barrier.wait()
            if i == 0:  # one thread combines and takes part in the ranks' collective
                stacked = torch.stack(slots)  # type: ignore[arg-type]
                y = stacked.sum(0) if op == "sum" else stacked.max(0).values
                result[0] = outer.reduce(y, op) if outer.world_size > 1 else y
            barrier.wait()  # result is read before the next call's first wait, which needs every thread
            records[i].append(result[0])  # type: ignore[arg-type]
            return result[0]  # type: ignore[return-value]

        return reduce

    def guarded(i: int):
        try:
            return run(i, Shard(outer.world_size * n, reducer(i)))
        except BaseException:
            barrier.abort()  # the other passes stop waiting and fail too
            raise

    with ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(guarded, i) for i in range(n)]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:  # the pass that failed, not the others it left at a broken barrier
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return records, [f.result() for f in futures]


class Replay:
    """A `Shard.reduce` that returns the recorded reduced values of one pass, in order."""

    def __init__(self, values: list[Tensor]):
        self.values, self.i = values, 0

    def __call__(self, x: Tensor, op: str = "sum") -> Tensor:
        if self.i >= len(self.values) or self.values[self.i].shape != x.shape:
            raise RuntimeError(f"micro-batch replay out of step at reduction {self.i}: the loss reduced "
                               "differently with grad than without")
        self.i += 1
        return self.values[self.i - 1]


def replayed(values: list[Tensor], outer: Shard, n: int) -> Shard:
    return Shard(outer.world_size * n, Replay(values))
