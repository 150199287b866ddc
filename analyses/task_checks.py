"""Does a task carry the loss scale issue? The length and on-policy-loss checks on recorded runs.

From the `per_mu` tables of finished runs (an experiment, or an ablation's parent run), pooled over runs:

- lengths by pass rate in a window of steps: mean length of right and of wrong answers per k, the gap
  (wrong - right) over the group's mean length, and how much the mean length varies across k;
- the on-policy identity: on the first mini-batch of a step (rho = 1) L_mu, the token-mean of l = -A g over the
  group, is -sum_i A_i |o_i| / sum_i |o_i|, which with group-std advantages (GRPO, DAPO, DARO) follows from the
  logged lengths alone; the largest |logged - predicted| is a consistency check of the record, not evidence;
- how far the on-policy L_mu stands above its step-to-step noise: per k, mean over the window's steps and
  t = mean / (std / sqrt(steps)).

    python -m analyses.task_checks --parent PARENT_RUN_ID --tracking-uri sqlite:///mlflow.db
    python -m analyses.task_checks --experiment daro-lab-demo --method dapo

The README's numbers on the chain task were printed by the first line on the methods ablation.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analyses.runs import AnalysisError, RunSet, as_runset, require_table
from daro_lab.algorithms import METHODS


def pooled_per_mu(runs: RunSet, method: str | None = None) -> pd.DataFrame:
    """The `per_mu` rows of every run (of `method`, if given), with columns `run` and `method` added."""
    have, _ = require_table(runs, "per_mu", "task checks")
    frames = []
    for r in have:
        if method is None or r.method == method:
            t = r.table("per_mu").copy()
            t["run"], t["method"] = r.run_id, r.method
            frames.append(t)
    if not frames:
        raise AnalysisError(f"no run of method {method!r} with a per_mu table")
    return pd.concat(frames, ignore_index=True)


def lengths_by_k(pm: pd.DataFrame) -> pd.DataFrame:
    """Per k: response-weighted mean length of right and wrong answers, the group's mean length and gap / mean."""
    K = int(pm.K.iloc[0])
    n_right, n_wrong = pm.prompts * pm.k, pm.prompts * (K - pm.k)
    g = pd.DataFrame({
        "right": (pm.len_correct * n_right).groupby(pm.k).sum() / n_right.groupby(pm.k).sum(),
        "wrong": (pm.len_incorrect * n_wrong).groupby(pm.k).sum() / n_wrong.groupby(pm.k).sum(),
    })
    g["mean"] = (g.right * g.index + g.wrong * (K - g.index)) / K
    g["gap_over_mean"] = (g.wrong - g.right) / g["mean"]
    return g


def predicted_on_policy_loss(on: pd.DataFrame, eps: float = 1e-6, unbiased: bool = True) -> pd.Series:
    """L_mu at rho = 1 from the logged lengths: -(A+ k L+ - |A-| (K - k) L-) / (k L+ + (K - k) L-), with
    A+ = (1 - mu) / (sigma + eps), |A-| = mu / (sigma + eps), sigma the group's reward std."""
    K = on.K
    mu = on.k / K
    sigma = np.sqrt(mu * (1 - mu) * (K / (K - 1) if unbiased else 1.0))
    a_pos, a_neg = (1 - mu) / (sigma + eps), mu / (sigma + eps)
    right, wrong = on.k * on.len_correct, (K - on.k) * on.len_incorrect
    return -(a_pos * right - a_neg * wrong) / (right + wrong)


def on_policy_t(on: pd.DataFrame) -> pd.DataFrame:
    """Per k: the on-policy L_mu's mean over the rows, its std, count and t = mean / (std / sqrt(count))."""
    st = on.groupby("k")["loss"].agg(["mean", "std", "count"])
    st["t"] = st["mean"] / (st["std"] / np.sqrt(st["count"]))
    return st


def report(runs: RunSet, method: str = "dapo", windows: Sequence[tuple[int, int]] = ((1, 1), (1, 10)),
           loss_windows: Sequence[tuple[int, int]] = ((1, 50),)) -> str:
    """The checks as text (module docstring): lengths over every run, the loss over the runs of `method`."""
    pm = pooled_per_mu(runs)
    last = int(pm.step.max())
    lines = [f"{pm.run.nunique()} runs, steps 1-{last}; per_mu rows {len(pm)}"]
    for lo, hi in [*windows, (max(1, last - 9), last)]:
        g = lengths_by_k(pm[(pm.step >= lo) & (pm.step <= hi)])
        lines.append(f"lengths, steps {lo}-{hi} (k = {', '.join(map(str, g.index))}): gap/mean "
                     f"{' '.join(f'{x:.2f}' for x in g.gap_over_mean)}; mean length "
                     f"{' '.join(f'{x:.1f}' for x in g['mean'])} (max/min {g['mean'].max() / g['mean'].min():.2f})")
    if method not in METHODS or METHODS[method].advantage != "group_std":
        raise AnalysisError(f"the on-policy prediction needs group-std advantages (grpo, dapo, daro); got {method!r}")
    on = pooled_per_mu(runs, method)
    on = on[on.minibatch == 0]
    err = (on["loss"] - predicted_on_policy_loss(on)).abs().max()
    lines.append(f"on-policy {method}: max |L_mu - predicted from lengths| = {err:.2g} over {len(on)} rows "
                 "(a consistency check)")
    for lo, hi in [*loss_windows, (max(1, last - 49), last)]:
        st = on_policy_t(on[(on.step >= lo) & (on.step <= hi)])
        lines.append(f"on-policy {method} L_mu, steps {lo}-{hi}: mean {' '.join(f'{x:.3f}' for x in st['mean'])}; "
                     f"t {' '.join('nan' if math.isnan(x) else f'{x:.1f}' for x in st.t)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    ap.add_argument("--experiment", default=None, help="experiment whose finished runs to read")
    ap.add_argument("--parent", default=None, help="an ablation's parent run id: its children")
    ap.add_argument("--method", default="dapo", help="method of the on-policy check, one with group-std advantages (default dapo)")
    a = ap.parse_args(argv)
    try:
        runs = as_runset(uri=a.tracking_uri, experiment=a.experiment, run_ids=[a.parent] if a.parent else None)
        print(report(runs, a.method))
    except AnalysisError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
