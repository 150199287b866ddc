"""The Hoeffding hook reads the loss's own clipped factor g (l = -A g) and records what recomputing it would."""

import pandas as pd
import torch

from daro_lab.algorithms import LossSettings, PolicyBatch, compute_advantages, loss_terms
from daro_lab.hooks import HoeffdingHook, MiniBatchView


class Tables:
    def __init__(self):
        self.tables = {}

    def log_table(self, name, rows, step):
        self.tables.setdefault(name, []).append(pd.DataFrame(rows))


def test_hoeffding_rows_from_the_loss_factor_equal_the_recomputed_ones():
    g = torch.Generator().manual_seed(0)
    K, P, T = 4, 3, 6
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (P * K,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    old = -torch.rand(P * K, T, generator=g, dtype=torch.float64)
    logp = old + 0.5 * torch.randn(P * K, T, generator=g, dtype=torch.float64)  # ratios past both clips
    adv = compute_advantages(rewards, "group_std").flatten()
    b = PolicyBatch(logp=logp, old_logp=old, mask=mask, advantages=adv, num_correct=rewards.sum(1).long().repeat_interleave(K),
                    rewards=rewards.flatten(), prompt_index=torch.arange(P).repeat_interleave(K))
    s = LossSettings(dual_clip=2.0)
    t = loss_terms("dapo", b, K, s)
    out = []
    for factor in (t.factor, None):
        view = MiniBatchView(1, 1, K, logp, old, mask, adv, b.num_correct, b.prompt_index, s.eps_low, s.eps_high,
                             s.dual_clip, t.metrics, factor)
        tr = Tables()
        HoeffdingHook(tr).on_minibatch(view)
        out.append(pd.concat(tr.tables["hoeffding"]))
    pd.testing.assert_frame_equal(out[0], out[1], rtol=1e-12)
    assert len(out[0]) and out[0].g_mean.std() > 0.05  # the ratios spread: the comparison is not of constants
