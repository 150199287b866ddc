"""The hook interface: the events of the loop, and what each event shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class MiniBatchView:
    """One optimizer step's mini-batch, detached. B responses x T tokens."""

    step: int  # RL step (one generation round)
    index: int  # mini-batch index within the step; index >= 1 is off-policy
    K: int
    logp: Tensor  # [B, T] log pi_theta before this update
    old_logp: Tensor  # [B, T] log pi_old (the sampling policy)
    mask: Tensor  # [B, T] float
    advantages: Tensor  # [B]
    num_correct: Tensor  # [B] long
    prompt_index: Tensor  # [B] long, index into the step's prompts
    metrics: dict[str, float]  # the loss's metrics for this mini-batch
    factor: Tensor  # [B, T] the loss's clipped factor g of l = -A g


class Hook:
    """Override the events you need; every one defaults to doing nothing."""

    def on_train_start(self, trainer: Any) -> None:
        """Once before the first step of `train()` (a resume included), with the Trainer and its cfg."""

    def on_rollout(
        self, step: int, prompts: list[str], responses: list[str], rewards: Tensor, answers: list[str]
    ) -> None:
        """After generation and scoring: rewards [P, K] for every prompt generated this step."""

    def on_minibatch(self, view: MiniBatchView) -> None: ...

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """After the step's updates: every metric of the step (a copy; changing it changes nothing)."""

    def on_eval(self, step: int, metrics: dict[str, float], table: list[dict]) -> None: ...

    def on_checkpoint(self, step: int) -> None:
        """A checkpoint was written: flush whatever must survive a kill."""

    def on_train_end(self, step: int, status: str) -> None: ...
