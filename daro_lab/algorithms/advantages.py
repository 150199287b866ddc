"""Advantage estimators (docs/math.md): computed once per step, over the step's prompts.

Every estimator maps rewards [P, K] (P prompts, K responses each, r in {0, 1}) to advantages
[P, K]. Prompts whose pass rate is 0 or 1 are not "kept": their advantage is 0 and they do not
enter the batch statistics (the std of LIPO). Registry: `ADVANTAGES[name](rewards, std, eps)`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

AdvantageFn = Callable[[Tensor, str, float], Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


def _check(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, K], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"K = {rewards.shape[1]} responses per prompt: a pass rate strictly between 0 and 1 needs K >= 2"
        )
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards))[0].tolist()
        raise ValueError(f"non-finite reward at [prompt {bad[0]}, response {bad[1]}]")


def kept_prompts(rewards: Tensor) -> Tensor:
    """[P] bool: prompts with 0 < mu < 1, the ones that carry gradient."""
    mu = rewards.mean(dim=1)
    return (mu > 0) & (mu < 1)


def _std(x: Tensor, std: str, dim: int | None = None) -> Tensor:
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    correction = 1 if std == "unbiased" else 0
    return x.std(dim=dim, correction=correction) if dim is not None else x.std(correction=correction)


@register_advantage("group_std")
def group_std(rewards: Tensor, std: str = "unbiased", eps: float = 1e-6) -> Tensor:
    """GRPO, DAPO: A = (r - mu_q) / (sigma_q + eps)."""
    _check(rewards)
    keep = kept_prompts(rewards)[:, None]
    mu = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    sigma = _std(rewards, std, dim=1)[:, None]  # [P, 1]
    return torch.where(keep, (rewards - mu) / (sigma + eps), torch.zeros_like(rewards))


@register_advantage("mean_only")
def mean_only(rewards: Tensor, std: str = "unbiased", eps: float = 1e-6) -> Tensor:
    """Dr. GRPO (arXiv 2503.20783): A = r - mu_q, no std normalisation."""
    _check(rewards)
    keep = kept_prompts(rewards)[:, None]
    return torch.where(keep, rewards - rewards.mean(dim=1, keepdim=True), torch.zeros_like(rewards))


@register_advantage("batch_std")
def batch_std(rewards: Tensor, std: str = "unbiased", eps: float = 1e-6) -> Tensor:
    """LIPO as Lite PPO (arXiv 2508.08221): group mean, std of all kept rewards of the step."""
    _check(rewards)
    keep = kept_prompts(rewards)
    if not keep.any():
        return torch.zeros_like(rewards)
    sigma = _std(rewards[keep].flatten(), std) if keep.sum() * rewards.shape[1] > 1 else rewards.new_zeros(())
    adv = (rewards - rewards.mean(dim=1, keepdim=True)) / (sigma + eps)
    return torch.where(keep[:, None], adv, torch.zeros_like(rewards))


def compute_advantages(rewards: Tensor, estimator: str, std: str = "unbiased", eps: float = 1e-6) -> Tensor:
    """Advantages [P, K] from rewards [P, K] with the named estimator."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[estimator](rewards, std, eps)
