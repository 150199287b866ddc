"""The built-in hooks: step metrics, per-mu tables, Hoeffding statistics, sample completions.

Each writes through a tracker with `log_metrics(dict, step)` and `log_table(name, rows, step)`
(daro_lab.tracking.Tracker, or anything with those two methods).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from daro_lab.hooks.base import Hook, MiniBatchView
from daro_lab.record import is_table_only, parse_group_key, per_mu_rows

# quantities that are a state after the step, not a per-step measurement: logged as they stand
STATE_PREFIXES = ("daro/weight/", "lr/")


class MetricsHook(Hook):
    """Step metrics (but those the tables hold, record.TABLE_ONLY) as MLflow metrics by step, and every evaluation.

    With `tracking.log_every` = n > 1, each metric is logged every n steps as its mean over those
    steps (NaN entries skipped), at the window's last step; state (STATE_PREFIXES: the DARO weights,
    the learning rates) is logged as it stands at that step. A checkpoint and the end of training
    close the window early, so a resumed run logs what an uninterrupted one does. The ablation
    summary reads these metrics, so n > 1 coarsens its windows too.
    """

    def __init__(self, tracker: Any, log_every: int = 1):
        self.tracker = tracker
        self.log_every = log_every
        self._window: dict[str, list[float]] = {}

    def on_train_start(self, trainer: Any) -> None:
        self.log_every = trainer.cfg.tracking.log_every

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if not is_table_only(k):
                self._window.setdefault(k, []).append(v)
        if step % self.log_every == 0:
            self._emit(step)

    def _emit(self, step: int) -> None:
        if not self._window:
            return
        out = {}
        for k, vs in self._window.items():
            finite = [v for v in vs if v == v]
            if k.startswith(STATE_PREFIXES):
                out[k] = vs[-1]
            else:
                out[k] = sum(finite) / len(finite) if finite else float("nan")
        self._window = {}
        self.tracker.log_metrics(out, step)

    def on_eval(self, step: int, metrics: dict[str, float], table: list[dict]) -> None:
        self.tracker.log_metrics(metrics, step)
        self.tracker.log_table("eval", table, step)

    def on_checkpoint(self, step: int) -> None:
        self._emit(step)
        self.tracker.flush()

    def on_train_end(self, step: int, status: str) -> None:
        self._emit(step)
        self.tracker.flush()


class PerMuTableHook(Hook):
    """Table `per_mu`: one row per (step, mini-batch, k) with the record's per-pass-rate quantities (record.PER_MU)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def on_minibatch(self, view: MiniBatchView) -> None:
        rows = per_mu_rows(view.metrics, view.K, step=view.step, minibatch=view.index)
        if rows:
            self.tracker.log_table("per_mu", rows, view.step)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Table `mu_hist`: the pass-rate distribution of every prompt generated this step."""
        hist = {}
        for key, v in metrics.items():
            parsed = parse_group_key(key)
            if parsed is not None and parsed[0] == "rollout/prompts":
                hist[(parsed[1], parsed[2])] = v
        if hist:
            self.tracker.log_table(
                "mu_hist",
                [{"step": step, "k": k, "K": K, "mu": k / K, "prompts": n} for (k, K), n in sorted(hist.items())],
                step,
            )


class HoeffdingHook(Hook):
    """Table `hoeffding`: per response of every off-policy mini-batch, the token-mean of the clipped factor.

    g_t = min(rho_t, 1 + eps_high) where A > 0 and max(rho_t, 1 - eps_low) where A < 0 (docs/math.md), read from
    the loss itself (MiniBatchView.factor: l = -A g); the
    row holds the response's length n, its mean g, the mean over its (k, sign of A) group, the largest
    ratio, and A: enough to measure deviations against the bound and the factorised loss's error.
    On the first mini-batch of a step rho = 1 exactly, so only mini-batches with index >= 1 are read.
    """

    def __init__(self, tracker: Any):
        self.tracker = tracker

    @torch.no_grad()
    def on_minibatch(self, view: MiniBatchView) -> None:
        if view.index == 0:
            return
        m = view.mask.to(torch.float64)
        rho = torch.exp((view.logp - view.old_logp).to(torch.float64)) * m
        g = view.factor.to(torch.float64) * m  # the loss's own g
        n = m.sum(1)
        keep = (n > 0) & (view.advantages != 0)
        if not keep.any():
            return
        g_mean = (g * m).sum(1) / n.clamp(min=1)
        sign = torch.sign(view.advantages).long()
        group = view.num_correct * 2 + (sign > 0).long()  # (k, sign) -> one id
        ids = group[keep]
        sums = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, ids, g_mean[keep])
        cnts = torch.zeros_like(sums).index_add_(0, ids, torch.ones_like(g_mean[keep]))
        group_mean = (sums / cnts.clamp(min=1))[group]
        rho_max = torch.where(m > 0, rho, torch.zeros_like(rho)).max(1).values
        cols = {
            "k": view.num_correct,
            "prompt": view.prompt_index,
            "adv": view.advantages,
            "sign": sign,
            "length": n,
            "g_mean": g_mean,
            "g_group_mean": group_mean,
            "rho_max": rho_max,
        }
        n_rows = int(keep.sum())
        table = pd.DataFrame(
            {
                "step": np.full(n_rows, view.step),
                "minibatch": np.full(n_rows, view.index),
                "K": np.full(n_rows, view.K),
                **{c: v[keep].cpu().numpy() for c, v in cols.items()},
            }
        )
        self.tracker.log_table("hoeffding", table, view.step)


class SamplesHook(Hook):
    """Table `samples`: the first `prompts` prompts' completions at step 1 and every `every` steps."""

    def __init__(self, tracker: Any, every: int = 10, prompts: int = 4):
        self.tracker, self.every, self.prompts = tracker, every, prompts

    def on_rollout(self, step, prompts, responses, rewards, answers) -> None:
        if step % self.every and step != 1:
            return
        K = rewards.shape[1]
        rows = [
            {
                "step": step,
                "prompt": prompts[p],
                "answer": answers[p],
                "response": responses[p * K + i],
                "reward": float(rewards[p, i]),
            }
            for p in range(min(self.prompts, len(prompts)))
            for i in range(K)
        ]
        self.tracker.log_table("samples", rows, step)


def default_hooks(tracker: Any) -> list[Hook]:
    return [MetricsHook(tracker), PerMuTableHook(tracker), HoeffdingHook(tracker), SamplesHook(tracker)]
