"""Does a task carry the loss scale issue? The length and on-policy-loss checks on recorded runs.

From the `per_mu` tables of finished runs (an experiment, or an ablation's parent run), pooled over runs:

- lengths by pass rate in a window of steps: mean length of right and of wrong answers per k, the gap
  (wrong - right) over the group's mean length, and how much the mean length varies across k;
- the on-policy identity: on the first mini-batch of a step (rho = 1) L_mu, the token-mean of l = -A g over the
  group, is -sum_i A_i |o_i| / sum_i |o_i|, which with group-std advantages (GRPO, DAPO, DARO) follows from the
  logged lengths alone; the largest |logged - predicted| is a consistency check of the record, not evidence;
- how far the on-policy L_mu stands above its step-to-step noise: per k, mean over the window's steps and
  t = mean / (std / sqrt(steps));
- for arms with weights (DARO, frozen): how near each group is to the weights' fixed point, w signal / C
  averaged over the last 50 steps (1 there), and the final weights, each as min-max over the arm's runs.

    python -m analyses.task_checks --parent PARENT_RUN_ID --tracking-uri sqlite:///mlflow.db
    python -m analyses.task_checks --experiment daro-lab-demo --method dapo

The README's numbers on the chain task (lengths, on-policy L_mu, balance, final weights) are what these lines
print for the methods, static-weights and weight-reg ablations.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from analyses.length_vs_mu import pool_lengths
from analyses.runs import AnalysisError, RunSet, as_runset, require_table
from daro_lab.algorithms import METHODS, compute_advantages


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
    """Per k: answer-weighted mean length of right and wrong answers (`length_vs_mu.pool_lengths`), the group's
    mean length and gap / mean."""
    K = int(pm.K.iloc[0])
    g = pool_lengths(pm, ["k"]).set_index("k").sort_index()
    g = g.rename(columns={"len_correct": "right", "len_incorrect": "wrong"})[["right", "wrong"]]
    g["mean"] = (g.right * g.index + g.wrong * (K - g.index)) / K
    g["gap_over_mean"] = (g.wrong - g.right) / g["mean"]
    return g


def group_advantages(k: int, K: int, std: str = "unbiased", eps: float = 1e-6) -> tuple[float, float]:
    """(A+, A-): the group-std advantage of a right and of a wrong answer of a prompt with k of K right, as the
    trainer computes it (`daro_lab.algorithms.compute_advantages` on the prompt's reward row)."""
    rewards = torch.tensor([[1.0] * k + [0.0] * (K - k)], dtype=torch.float64)
    adv = compute_advantages(rewards, "group_std", std, eps)[0]
    return float(adv[0]), float(adv[-1])


def predicted_on_policy_loss(on: pd.DataFrame, std: str = "unbiased", eps: float = 1e-6) -> pd.Series:
    """L_mu at rho = 1 from the logged lengths: -(A+ k L+ + A- (K - k) L-) / (k L+ + (K - k) L-), with A+ and A-
    the group-std advantages of a right and a wrong answer (`group_advantages`: the run's algo.std, algo.adv_eps)."""
    adv = {(k, K): group_advantages(k, K, std, eps) for k, K in set(zip(on.k.astype(int), on.K.astype(int)))}
    a_pos = pd.Series([adv[(k, K)][0] for k, K in zip(on.k.astype(int), on.K.astype(int))], index=on.index)
    a_neg = pd.Series([adv[(k, K)][1] for k, K in zip(on.k.astype(int), on.K.astype(int))], index=on.index)
    right, wrong = on.k * on.len_correct, (on.K - on.k) * on.len_incorrect
    return -(a_pos * right + a_neg * wrong) / (right + wrong)


def advantage_settings(runs: RunSet, method: str) -> tuple[str, float]:
    """(algo.std, algo.adv_eps) the runs of `method` trained with (one setting: an AnalysisError otherwise)."""
    seen = {
        (r.param("algo.std", "unbiased"), r.param("algo.adv_eps", 1e-6, float)) for r in runs.runs if r.method == method
    }
    if len(seen) != 1:
        raise AnalysisError(
            f"the runs of {method!r} differ in algo.std / algo.adv_eps ({sorted(seen)}): "
            "check them one setting at a time"
        )
    return seen.pop()


def on_policy_t(on: pd.DataFrame) -> pd.DataFrame:
    """Per k: the on-policy L_mu's mean over the rows, its std, count and t = mean / (std / sqrt(count))."""
    st = on.groupby("k")["loss"].agg(["mean", "std", "count"])
    st["t"] = st["mean"] / (st["std"] / np.sqrt(st["count"]))
    return st


def balance_by_group(runs: RunSet, window: int = 50) -> pd.DataFrame:
    """Per arm with weights (DARO, frozen) and k: w_mu signal_mu / C over the last `window` steps (1 at the
    weights' fixed point w = C / signal), mean per run, and the final weight (the last one logged: a group absent
    from the last step keeps the value of its last step); min and max over the arm's runs.

    Columns: arm, k, K, balance_min, balance_max, w_min, w_max, runs, step_first, step_last."""
    rows = []
    for arm, members in runs.arms().items():
        per_run = []
        for r in members:
            t = r.table("per_mu")
            if t is None or "daro/wS" not in t.columns:
                continue
            t = t.dropna(subset=["daro/wS"])
            if t.empty:
                continue
            last = int(t.step.max())
            win = t[t.step > last - window]
            final = t.sort_values("step").groupby("k")["daro/weight_used"].last()  # its last logged value
            per_run.append((win.groupby("k")["daro/wS"].mean(), final, int(win.step.min()), last, int(t.K.iloc[0])))
        if not per_run:
            continue
        bal = pd.concat([p[0] for p in per_run], axis=1)
        w = pd.concat([p[1] for p in per_run], axis=1)
        for k in bal.index:
            rows.append(
                {
                    "arm": arm,
                    "k": int(k),
                    "K": per_run[0][4],
                    "balance_min": bal.loc[k].min(),
                    "balance_max": bal.loc[k].max(),
                    "w_min": w.loc[k].min() if k in w.index else math.nan,
                    "w_max": w.loc[k].max() if k in w.index else math.nan,
                    "runs": int(bal.loc[k].count()),
                    "step_first": min(p[2] for p in per_run),
                    "step_last": max(p[3] for p in per_run),
                }
            )
    return pd.DataFrame(rows)


def _range(lo: float, hi: float, fmt: str = ".2f") -> str:
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def report(
    runs: RunSet,
    method: str | None = None,
    windows: Sequence[tuple[int, int]] = ((1, 1), (1, 10)),
    loss_windows: Sequence[tuple[int, int]] = ((1, 50),),
) -> str:
    """The checks as text (module docstring): lengths over every run, the on-policy loss over the runs of
    `method` (None: DAPO's when there are any, else the first method with group-std advantages), the balance
    of every arm with weights."""
    pm = pooled_per_mu(runs)
    last = int(pm.step.max())
    lines = [f"{pm.run.nunique()} runs, steps 1-{last}; per_mu rows {len(pm)}"]
    for lo, hi in [*windows, (max(1, last - 9), last)]:
        g = lengths_by_k(pm[(pm.step >= lo) & (pm.step <= hi)])
        lines.append(
            f"lengths, steps {lo}-{hi} (k = {', '.join(map(str, g.index))}): gap/mean "
            f"{' '.join(f'{x:.2f}' for x in g.gap_over_mean)}; mean length "
            f"{' '.join(f'{x:.1f}' for x in g['mean'])} (max/min {g['mean'].max() / g['mean'].min():.2f})"
        )
    if method is None:
        present = sorted(
            {r.method for r in runs.runs if METHODS.get(r.method) and METHODS[r.method].advantage == "group_std"},
            key=lambda m: (m != "dapo", list(METHODS).index(m)),
        )
        method = present[0] if present else None
        if method is None:
            lines.append("on-policy check: no run with group-std advantages (grpo, dapo, daro, static)")
    elif method not in METHODS or METHODS[method].advantage != "group_std":
        raise AnalysisError(f"the on-policy prediction needs group-std advantages (grpo, dapo, daro); got {method!r}")
    if method is not None:
        on = pooled_per_mu(runs, method)
        on = on[on.minibatch == 0]
        err = (on["loss"] - predicted_on_policy_loss(on, *advantage_settings(runs, method))).abs().max()
        lines.append(
            f"on-policy {method}: max |L_mu - predicted from lengths| = {err:.2g} over {len(on)} rows "
            "(a consistency check)"
        )
        for lo, hi in [*loss_windows, (max(1, last - 49), last)]:
            st = on_policy_t(on[(on.step >= lo) & (on.step <= hi)])
            lines.append(
                f"on-policy {method} L_mu, steps {lo}-{hi}: mean {' '.join(f'{x:.3f}' for x in st['mean'])}; "
                f"t {' '.join('nan' if math.isnan(x) else f'{x:.1f}' for x in st.t)}"
            )
    bal = balance_by_group(runs)
    for arm, d in bal.groupby("arm", sort=False):
        lines.append(
            f"balance w signal/C of '{arm}' ({d.runs.max()} runs), mean over steps {d.step_first.min()}-"
            f"{d.step_last.max()} by k (min-max over runs; 1 at the fixed point): "
            + ", ".join(f"{r.k}: {_range(r.balance_min, r.balance_max, '.3f')}" for r in d.itertuples())
            + "; final w: "
            + ", ".join(f"{r.k}: {_range(r.w_min, r.w_max)}" for r in d.itertuples())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    ap.add_argument("--experiment", default=None, help="experiment whose finished runs to read")
    ap.add_argument("--parent", default=None, help="an ablation's parent run id: its children")
    ap.add_argument(
        "--method",
        default=None,
        help="method of the on-policy check, one with group-std advantages "
        "(default: dapo if the runs have it, else the first such method they have)",
    )
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
