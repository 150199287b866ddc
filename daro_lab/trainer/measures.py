"""What a step records of its rollout and of the generation engine, beside the loss's own metrics
(`algorithms.losses`) and the update's (`trainer.update`)."""

from __future__ import annotations

import torch

from daro_lab import distributed as dp
from daro_lab.algorithms import PolicyBatch
from daro_lab.record import REWARD_MEAN, mu_key
from daro_lab.rollout import RolloutBatch


def rollout_metrics(roll: RolloutBatch, rewards: torch.Tensor, keep: torch.Tensor, n_batches: int) -> dict[str, float]:
    """The step's rollout of P prompts x K responses (rewards [P, K], keep [P] the kept prompts, n_batches generated
    to get them): reward, lengths, the pass-rate histogram and the sampled tokens' entropy estimate."""
    K = rewards.shape[1]
    lengths = roll.response_mask.sum(1).float()
    correct = rewards.flatten() > 0.5
    k_all = rewards.sum(1).round().long()
    hist = torch.bincount(k_all, minlength=K + 1)
    m = {
        REWARD_MEAN: float(rewards.mean()),
        "rollout/prompts": float(len(rewards)),
        "rollout/kept_prompts": float(keep.sum()),
        "rollout/prompts_mu0": float(hist[0]),
        "rollout/prompts_mu1": float(hist[K]),
        "rollout/batches": float(n_batches),
        "length/mean": float(lengths.mean()),
        # mean of -log pi(sampled token): a Monte Carlo estimate of the per-token policy entropy
        "entropy/token_mc": float(-(roll.logprobs * roll.response_mask).sum() / roll.response_mask.sum().clamp(min=1)),
        "length/correct": float(lengths[correct].mean()) if correct.any() else float("nan"),
        "length/incorrect": float(lengths[~correct].mean()) if (~correct).any() else float("nan"),
    }
    for kk in range(K + 1):
        m[f"rollout/prompts/{mu_key(kk, K)}"] = float(hist[kk])
    return m


def engine_gap(b: PolicyBatch, engine_logprobs: list[torch.Tensor], dist: dp.DistInfo) -> dict[str, float]:
    """|engine log-prob - trainer log-prob| over the on-policy mini-batch's response tokens (all ranks):
    ~0 when the engine samples from the trained weights (a stale or mis-synced vLLM shows up here; with
    top_p < 1 the transformers engine reports the truncated distribution's log-probs)."""
    T = b.logp.shape[1]
    eng = torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) for x in engine_logprobs]).to(b.logp.device)
    gap = (b.logp.detach().float() - eng.float()).abs() * b.mask
    stats = torch.stack([gap.sum(), b.mask.sum()]).double()
    top = gap.max().double() if gap.numel() else torch.zeros((), dtype=torch.float64, device=gap.device)
    if dist.enabled:
        stats, top = dp.all_reduce(stats), dp.all_reduce(top, "max")
    return {
        "rollout/engine_logprob_gap_mean": float(stats[0] / stats[1].clamp(min=1)),
        "rollout/engine_logprob_gap_max": float(top),
    }
