"""Which prompts each rank runs in each mini-batch and pass of a step: a pure function of sizes.

A step keeps P prompts (0 < mu < 1, in the order they were generated). They are cut into mini-batches of
`mini_batch_prompts` (one optimizer step each; the first is on-policy). Under data parallelism a mini-batch's
prompts are split over the ranks as evenly as `distributed.split` does; a rank's share runs in passes of at most
`micro_batch_prompts` prompts (gradient accumulation), and every rank runs as many passes as the rank with the
most prompts, so that the collectives of the loss stay in step: a rank with fewer prompts runs filler passes
(rows with no tokens, which count for nothing).

    plans = plan_minibatches(P=10, mini_batch_prompts=4, micro_batch_prompts=0, world_size=2, rank=1)
    plans[0].passes[0].positions   # tensor([2, 3]): rank 1's prompts of the first mini-batch, in the kept order
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from daro_lab.distributed import split_range


@dataclass(frozen=True)
class PassPlan:
    """One forward/backward pass of this rank."""

    positions: Tensor  # [p] long: the pass's prompts, as positions in the step's kept prompts; empty: a filler pass
    first: int  # position of the mini-batch's first prompt: the rows a filler pass borrows its shapes from

    @property
    def filler(self) -> bool:
        return len(self.positions) == 0


@dataclass(frozen=True)
class MiniBatchPlan:
    """One optimizer step: this rank's passes, whose gradients add up to the mini-batch's."""

    index: int  # 0: on-policy (the sampler's log-probs are the policy's); later ones are off-policy
    positions: Tensor  # [m] long: the mini-batch's prompts (every rank's), as positions in the kept prompts
    passes: tuple[PassPlan, ...]

    @property
    def on_policy(self) -> bool:
        return self.index == 0


def plan_minibatches(
    P: int, mini_batch_prompts: int, micro_batch_prompts: int = 0, world_size: int = 1, rank: int = 0
) -> list[MiniBatchPlan]:
    """The mini-batches of a step with P kept prompts, and this rank's passes in each (module docstring).
    micro_batch_prompts 0: a rank's whole share in one pass."""
    if mini_batch_prompts < 1 or micro_batch_prompts < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"bad plan: mini_batch_prompts={mini_batch_prompts}, micro_batch_prompts="
            f"{micro_batch_prompts}, world_size={world_size}, rank={rank}"
        )
    plans = []
    for index, start in enumerate(range(0, P, mini_batch_prompts)):
        positions = torch.arange(start, min(start + mini_batch_prompts, P))
        share = -(-len(positions) // world_size)  # the largest rank's prompts: every rank makes as many passes
        per = micro_batch_prompts if 0 < micro_batch_prompts < share else share
        mine = positions[split_range(len(positions), world_size, rank)]
        passes = tuple(PassPlan(mine[j : j + per], start) for j in range(0, share, per))
        plans.append(MiniBatchPlan(index, positions, passes))
    return plans
