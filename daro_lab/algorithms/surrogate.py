"""The clipped per-token surrogate of PPO/GRPO with asymmetric clip, dual clip and a k3 KL term.

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) = -A g_t,    rho_t = exp(logp_t - old_logp_t)

written as -A times the clipped factor g (the unified view of the paper):

    g_t = min(rho_t, 1 + eps_high)                  where A > 0   (g in [0, 1 + eps_high])
    g_t = max(rho_t, 1 - eps_low)  [, <= c]         where A < 0   (dual clip, arXiv 1912.09729, caps it at c)

g carries the gradient exactly where the clip is inactive. All shapes are [B, T] for B responses of T
(padded) tokens; the advantage is per response, [B].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Surrogate(NamedTuple):
    loss: Tensor  # [B, T] per-token loss l = -A g (before any aggregation)
    factor: Tensor  # [B, T] g, the clipped ratio (differentiable where the clip is inactive)
    ratio: Tensor  # [B, T] rho, detached
    clipped: Tensor  # [B, T] bool: the clip is active (the token's gradient is cut)


def clipped_surrogate(
    logp: Tensor,  # [B, T] log pi_theta
    old_logp: Tensor,  # [B, T] log pi_old (the sampling policy)
    adv: Tensor,  # [B]
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
) -> Surrogate:
    a = adv[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    r = ratio.detach()
    pos = torch.where(r > 1.0 + eps_high, torch.full_like(ratio, 1.0 + eps_high), ratio)  # A > 0
    neg = torch.where(r < 1.0 - eps_low, torch.full_like(ratio, 1.0 - eps_low), ratio)  # A < 0
    active = ((a > 0) & (r > 1.0 + eps_high)) | ((a < 0) & (r < 1.0 - eps_low))
    if dual_clip is not None:
        neg = torch.where(r > dual_clip, torch.full_like(ratio, dual_clip), neg)
        active = active | ((a < 0) & (r > dual_clip))
    g = torch.where(a > 0, pos, neg)
    return Surrogate(-a * g, g, r, active)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """[B, T] k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020): e^(ref-logp) - (ref-logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0
