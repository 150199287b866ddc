"""The Hoeffding hook reads the loss's own clipped factor g (l = -A g): its rows against a naive loop."""

import math

import pandas as pd
import pytest
import torch

from daro_lab.algorithms import LossSettings, PolicyBatch, compute_advantages, loss_terms
from daro_lab.hooks import HoeffdingHook, MiniBatchView


class Tables:
    def __init__(self):
        self.tables = {}

    def log_table(self, name, rows, step):
        self.tables.setdefault(name, []).append(pd.DataFrame(rows))


def test_hoeffding_rows_are_the_naive_loop_over_the_loss_factor():
    g = torch.Generator().manual_seed(0)
    K, P, T = 4, 3, 6
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (P * K,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(P * K, T, generator=g, dtype=torch.float64)
    logp = old + 0.5 * torch.randn(P * K, T, generator=g, dtype=torch.float64)  # ratios past both clips
    adv = compute_advantages(rewards, "group_std").flatten()
    b = PolicyBatch(
        logp=logp,
        old_logp=old,
        mask=mask,
        advantages=adv,
        num_correct=rewards.sum(1).long().repeat_interleave(K),
        rewards=rewards.flatten(),
        prompt_index=torch.arange(P).repeat_interleave(K),
    )
    s = LossSettings(dual_clip=2.0)
    t = loss_terms("dapo", b, K, s)
    view = MiniBatchView(1, 1, K, logp, old, mask, adv, b.num_correct, b.prompt_index, t.metrics, t.factor)
    tr = Tables()
    HoeffdingHook(tr).on_minibatch(view)
    got = pd.concat(tr.tables["hoeffding"]).reset_index(drop=True)
    # naive: each row's token-mean of g = min(rho, 1 + eps_high) (A > 0), max(rho, 1 - eps_low) capped at the dual
    # clip (A < 0), and the mean of that over its (k, sign of A) group
    rows = []
    for i in range(P * K):
        n = int(lengths[i])
        if adv[i] == 0:
            continue
        gs = []
        for j in range(n):
            rho = math.exp(float(logp[i, j] - old[i, j]))
            gs.append(min(rho, 1 + s.eps_high) if adv[i] > 0 else min(max(rho, 1 - s.eps_low), s.dual_clip))
        rows.append((int(b.num_correct[i]), float(adv[i] > 0), n, sum(gs) / n))
    assert len(got) == len(rows) and got.g_mean.std() > 0.05  # the ratios spread: not a comparison of constants
    for (k, pos, n, g_mean), (_, r) in zip(rows, got.iterrows()):
        assert (r.k, r.length) == (k, n) and r.g_mean == pytest.approx(g_mean, rel=1e-12)
        same = [gm for kk, pp, _, gm in rows if (kk, pp) == (k, pos)]
        assert r.g_group_mean == pytest.approx(sum(same) / len(same), rel=1e-12)
