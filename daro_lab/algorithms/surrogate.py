"""The clipped per-token surrogate of PPO/GRPO with asymmetric clip, dual clip and a k3 KL term.

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),    rho_t = exp(logp_t - old_logp_t)

Dual clip (arXiv 1912.09729) caps the loss of a negative advantage at -c A. All shapes are
[B, T] for B responses of T (padded) tokens; the advantage is per response, [B].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Surrogate(NamedTuple):
    loss: Tensor  # [B, T] per-token loss l (before any aggregation)
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
    unclipped = -ratio * a
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * a
    loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    active = ((a > 0) & (r > 1.0 + eps_high)) | ((a < 0) & (r < 1.0 - eps_low))
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * a)
        loss = torch.where(a < 0, capped, loss)
        active = active | ((a < 0) & (r > dual_clip))
    return Surrogate(loss, r, active)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """[B, T] k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020): e^(ref-logp) - (ref-logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0
