"""The statistical summary of an ablation: per arm, the mean over seeds with a 95% t-interval, the seed range
shown apart, and a paired test against the reference arm with its minimal detectable difference (MDD). Everything
is read back from what the child runs logged in MLflow.

Per child run (table `per_seed`, one row per arm and seed):
- `final_acc`: held-out accuracy at the last evaluation: greedy (`eval/greedy_acc`) or, with the grid's
  `accuracy = "sampled"`, the mean reward of `trainer.eval_samples` samples per prompt at the rollout
  temperature (`eval/sampled_acc`, avg@n: what training optimises);
- `best_acc`: the best of the evaluations after the start (step >= 1; step 0 is the starting policy,
  the same convention as analyses.report);
- `auc_acc`: the area under the run's accuracy curve from step 0 to its last evaluation (trapezoids), divided by
  that many steps: the mean accuracy over training, a convergence speed that needs no target and does not
  hinge on one crossing of a noisy plateau;
- `steps_to_target`: the first evaluation step whose accuracy is >= the target (the grid's `target_acc`, or by
  default `progress_target`: TARGET_FRACTION of the way from the mean starting accuracy to the best arm's mean
  final accuracy, the definition the convergence figure uses too), with `reached` 1; a seed that never reaches it
  is censored at its last evaluation step (`reached` 0), never dropped. Evaluations happen every
  `trainer.eval_every` steps, so this is resolved only to that grid;
- `c_share_cv`, `g_share_cv` (per group) and `c_share_cv_prompt`, `g_share_cv_prompt` (per prompt): how unequally
  the pass-rate groups share the update, comparable across every method (not true by construction for any): each
  group's share of the sum over groups of |C_mu| (its loss contribution less DARO's -C ln w_mu, which carries no
  theta-gradient: per_mu columns contrib - contrib_offset) or of G_mu = ||grad C_mu|| (column gradnorm, measured
  every `trainer.grad_norm_every` steps) over the last `balance_window` steps, per group or divided by the group's
  prompts in those mini-batches, then their coefficient of variation across groups (0: equal shares). Runs without
  a per_mu table: per group from the metrics `contrib/` and `gradnorm/` (C on DARO's path then left out: its metric
  holds the offset);
- `balance_cv`: a diagnostic of each method's own balance quantity, tested only between arms that share it.
  For each pass-rate group, the mean over the last `balance_window` training steps of x_mu: DARO's
  w_mu * signal_mu / C (metric `daro/wS/mu_k`, 1 at its fixed point, where learned weights put it by
  construction: a convergence check of the weights, not evidence of balance; older runs: w_mu * L_mu,
  `daro/wL/mu_k`) on DARO's code path (methods daro and static), the group's contribution C_mu (metric
  `contrib/mu_k`) for every other method. Then the
  coefficient of variation (population std / mean) of |window mean| across the groups: 0 means every
  group contributes the same. `balance_floor` beside it is the noise floor: the expected CV of |x|
  across that many groups when x is zero-mean noise (no group differs from another on average): 0.44
  for two groups, 0.68 for seven, 0.76 for many; a balance CV near it says nothing about balance (averaging the per-step CV, as earlier
  versions did, gave about this value on a task whose C_mu is noise);
- with `weight_stats` (runs that logged DARO weights): `weight_var`, the variance across groups of the
  final weights w_mu; `balance_gap`, the mean over the last window and the groups of
  |w_mu signal_mu / C - 1| (older runs: | |w_mu L_mu| - 1 |): how close DARO gets to its fixed point; `at_bound`, 1 if any weight sat on
  w_min or w_max at any step (metric `daro/at_bound`); `nonfinite`, 1 if any weight, w*L or loss was
  NaN/inf, or the run failed on a non-finite value (FloatingPointError in its traceback).

Per arm (table `summary`): for each of these, the mean over seeds with a 95% t-interval of the mean
(`<m>_lo`, `<m>_hi`: mean +- t_{0.975, n-1} sd / sqrt(n)), and the seed range apart (`<m>_min`, `<m>_max`: the
spread of the seeds, not an interval for the mean); with one seed there is no interval (NaN), never a made-up one.
(A percentile bootstrap of a 3-seed mean is exactly [min, max] of the seeds and covers the mean about 75% of the
time: `mean_ci(method="bootstrap")` refuses fewer than 5 values.) Steps to target is a Kaplan-Meier restricted
mean over the seeds (censored seeds count up to their last evaluation), shown with '>=' when a seed was censored,
since the true mean is then larger; its interval bootstraps that statistic over seeds, so it is given only from 5
seeds. Paired test against the reference arm, pairing runs by seed: the paired t-test (scipy.stats.ttest_rel,
two-sided) or the Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for small n; it cannot reach p < 0.05
with fewer than 6 pairs); the column `test` names it. `<metric>_diff` is the mean of arm minus reference over the
pairs; `<metric>_mdd` the minimal detectable difference of that paired test (two-sided alpha 0.05, power 0.8,
from the pairs' sd: (t_{0.975, n-1} + t_{0.8, n-1}) sd_d / sqrt(n)): a p above alpha says "no difference larger
than the MDD", not "no difference". Fewer than two pairs, or pairs that all differ by the same amount (no variance):
no MDD.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from daro_lab.record import EVAL_ACC, EVAL_GREEDY, LOSS_TOTAL, eval_level_key, wide

ACC = EVAL_GREEDY
ACC_KEYS = EVAL_ACC  # the grid's `accuracy`: an evaluation mode
_LEVEL_RE = re.compile(r"^(greedy|sampled):level_(-?\d+)$")


def acc_key(accuracy: str) -> str:
    """The metric a grid's `accuracy` compares: 'greedy' or 'sampled' (all held-out prompts), or 'MODE:level_N' (the
    held-out prompts of level N only, `eval/MODE_acc/level_N`, e.g. the hardest level as the endpoint).
    ValueError naming the value otherwise."""
    if accuracy in ACC_KEYS:
        return ACC_KEYS[accuracy]
    m = _LEVEL_RE.match(accuracy)
    if not m:
        raise ValueError(f"expected 'greedy', 'sampled', 'greedy:level_N' or 'sampled:level_N', got {accuracy!r}")
    return eval_level_key(m.group(1), m.group(2))


def acc_mode(accuracy: str) -> str:
    """'greedy' or 'sampled': the decoding of the grid's `accuracy` (without its level)."""
    acc_key(accuracy)
    return accuracy.split(":")[0]


SHARE_METRICS = ("c_share_cv", "g_share_cv", "c_share_cv_prompt", "g_share_cv_prompt")
STAT_METRICS = ("final_acc", "best_acc", "auc_acc", "steps_to_target", *SHARE_METRICS, "balance_cv", "balance_floor")
WEIGHT_METRICS = ("weight_var", "balance_gap")
TESTED = ("final_acc", "best_acc", "auc_acc", *SHARE_METRICS, "balance_cv")  # balance_cv: same source only
TARGET_FRACTION = 0.8  # steps to target: this fraction of the way from the start to the best arm's final accuracy
TEST_NAMES = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank"}


# --------------------------------------------------------------------------------------------
# Statistics


def mean_ci(
    values: Sequence[float], level: float = 0.95, method: str = "t", n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float, float, int]:
    """(mean, CI low, CI high, n) over the finite values: a t-interval of the mean (method 't'), or a bootstrap
    percentile interval ('bootstrap', refused below 5 values: with n = 3 it is the seed range). n = 1: (v, NaN,
    NaN, 1), no interval. All values equal: the interval is that value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if method not in ("t", "bootstrap"):
        raise ValueError(f"unknown interval {method!r}: 't' or 'bootstrap'")
    if method == "bootstrap" and n < 5:
        raise ValueError(
            f"a bootstrap interval of a mean of {n} values is their range, not a {level:.0%} interval: "
            "use the t-interval (method='t') below 5 values"
        )
    if n == 1:
        return m, math.nan, math.nan, 1
    if np.ptp(v) == 0:
        return m, m, m, n
    from scipy import stats

    if method == "t":
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
        return m, m - half, m + half, n
    res = stats.bootstrap(
        (v,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    return m, float(res.confidence_interval.low), float(res.confidence_interval.high), n


def seed_range(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the finite values: the seeds' spread, shown apart from any interval of the mean."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    return (float(min(v)), float(max(v))) if v else (math.nan, math.nan)


def paired_mdd(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """The minimal detectable difference of a two-sided paired t-test at `alpha` with `power`, from the sd of the
    pairs' differences: (t_{1-alpha/2, n-1} + t_{power, n-1}) sd_d / sqrt(n). NaN with fewer than 2 pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    n = len(d)
    if n < 2 or np.ptp(d) == 0:  # identical differences: no variance, no test, no power to speak of
        return math.nan
    from scipy import stats

    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * d.std(ddof=1) / math.sqrt(n))


def pairs_for_mdd(sd_diff: float, mdd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired seeds a paired t-test needs to detect a difference `mdd` when the differences have sd `sd_diff`."""
    from scipy import stats

    for n in range(2, 100_000):
        if (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd_diff / math.sqrt(n) <= mdd:
            return n
    return 100_000


def progress_target(start: float, plateau: float, fraction: float = TARGET_FRACTION) -> float:
    """The steps-to-target accuracy: `fraction` of the way from `start` (the mean starting accuracy) to `plateau`
    (the best arm's mean final accuracy), shared by the ablation summary and the convergence figure; when no arm
    improves on the start, the plateau itself."""
    if not (np.isfinite(start) and np.isfinite(plateau)):
        return math.nan
    return float(start + fraction * (plateau - start)) if plateau > start else float(plateau)


def paired_test(a: Sequence[float], b: Sequence[float], test: str = "t") -> tuple[float, float, int]:
    """(mean of a - b, two-sided p-value, pairs) over the pairs where both are finite.

    Fewer than two pairs: p NaN. Every difference zero: p = 1 (no evidence of a difference).
    Constant non-zero differences (zero variance): the t-test is undefined, p NaN."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    n = len(d)
    if n == 0:
        return math.nan, math.nan, 0
    diff = float(d.mean())
    if n < 2:
        return diff, math.nan, n
    if np.all(d == 0):
        return diff, 1.0, n
    from scipy import stats

    if test == "t":
        if np.ptp(d) == 0:
            return diff, math.nan, n
        p = float(stats.ttest_rel(x[ok], y[ok]).pvalue)
    elif test == "wilcoxon":
        p = float(stats.wilcoxon(x[ok], y[ok]).pvalue)
    else:
        raise ValueError(f"unknown paired test {test!r}: 't' or 'wilcoxon'")
    return diff, p, n


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population std / mean of |values| (NaN with fewer than two values or a zero mean)."""
    v = np.abs(np.asarray([x for x in values if np.isfinite(x)], dtype=float))
    if len(v) < 2 or v.mean() == 0:
        return math.nan
    return float(v.std(ddof=0) / v.mean())


@functools.lru_cache(maxsize=64)
def noise_floor_cv(groups: int, draws: int = 20000, seed: int = 0) -> float:
    """E[CV of |x_1..x_G|] for x iid N(0, 1): what `coefficient_of_variation` gives across `groups` groups
    when no group differs from another on average (scale-free, so any zero-mean noise level gives it)."""
    if groups < 2:
        return math.nan
    a = np.abs(np.random.default_rng(seed).standard_normal((draws, groups)))
    return float((a.std(axis=1) / a.mean(axis=1)).mean())


def km_restricted_mean(times: Sequence[float], reached: Sequence[bool]) -> float:
    """Kaplan-Meier restricted mean of the time to an event: `times` are event times where `reached`, else
    censoring times; integrated up to the largest time. With one common censoring time this is the mean of
    min(time, horizon) over all seeds. NaN without data."""
    t = np.asarray(times, dtype=float)
    e = np.asarray(reached, dtype=bool)
    ok = np.isfinite(t)
    t, e = t[ok], e[ok]
    if not len(t):
        return math.nan
    order = np.lexsort((~e, t))  # at equal times, events before censorings
    t, e = t[order], e[order]
    surv, area, prev, at_risk = 1.0, 0.0, 0.0, len(t)
    for ti, ei in zip(t, e):
        area += surv * (ti - prev)
        prev = ti
        if ei:
            surv *= 1 - 1 / at_risk
        at_risk -= 1
    return float(area)


def km_ci(
    times: Sequence[float], reached: Sequence[bool], level: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float, float, int]:
    """(restricted mean, CI low, CI high, n): a bootstrap percentile interval over seeds (as mean_ci)."""
    t = np.asarray(times, dtype=float)
    e = np.asarray(reached, dtype=float)
    ok = np.isfinite(t)
    t, e = t[ok], e[ok]
    n = len(t)
    m = km_restricted_mean(t, e.astype(bool))
    if n < 5:  # a percentile bootstrap of fewer seeds is their range, not an interval
        return m, math.nan, math.nan, n
    if np.ptp(t) == 0 and np.ptp(e) == 0:
        return m, m, m, n
    from scipy import stats

    res = stats.bootstrap(
        (t, e),
        lambda a, b: km_restricted_mean(a, b.astype(bool)),
        paired=True,
        vectorized=False,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return m, float(res.confidence_interval.low), float(res.confidence_interval.high), n


# --------------------------------------------------------------------------------------------
# Per run


def _acc_words(accuracy: str) -> str:
    """'sampled:level_5' -> 'sampled held-out accuracy on the level-5 prompts only (eval/sampled_acc/level_5)'."""
    mode, _, level = accuracy.partition(":")
    return (
        f"{mode} held-out accuracy on the {level.replace('_', '-')} prompts only ({acc_key(accuracy)})"
        if level
        else f"{mode} held-out accuracy"
    )


def run_stats(
    metrics: pd.DataFrame,
    method: str,
    window: int,
    weight_stats: bool = False,
    w_bounds: tuple[float, float] | None = None,
    acc_key: str = ACC,
    per_mu: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The per-run numbers of the module docstring from a run's `read_metrics` frame and its `per_mu` table (None:
    the share CVs per group from the metrics, none per prompt); steps_to_target needs the target: `steps_to_target`."""
    out: dict[str, Any] = {}
    acc = metrics[metrics.key == acc_key].sort_values("step")
    out["start_acc"] = float(acc.value[acc.step == 0].iloc[0]) if (acc.step == 0).any() else math.nan
    out["final_acc"] = float(acc.value.iloc[-1]) if len(acc) else math.nan
    later = acc[acc.step >= 1]
    out["best_acc"] = float(later.value.max()) if len(later) else math.nan
    out["final_step"] = int(acc.step.iloc[-1]) if len(acc) else -1
    out["auc_acc"] = area_under_curve(acc.step.to_numpy(dtype=float), acc.value.to_numpy(dtype=float))
    from daro_lab.algorithms import METHODS

    daro_path = method in METHODS and METHODS[method].daro_path
    if per_mu is not None and len(per_mu):
        out.update(table_share_cvs(per_mu, window))
    else:
        out["c_share_cv"] = math.nan if daro_path else share_cv(wide(metrics, "contrib"), window)
        out["g_share_cv"] = share_cv(wide(metrics, "gradnorm"), window)
        out["c_share_cv_prompt"] = out["g_share_cv_prompt"] = math.nan
    if daro_path:
        source = "wS" if metrics.key.str.startswith("daro/wS/mu_").any() else "wL"
        by_k = wide(metrics, f"daro/{source}")
    else:
        source, by_k = "C", wide(metrics, "contrib")
    out["balance_source"] = source
    if len(by_k):
        last = int(by_k.index.max())
        means = by_k[by_k.index > last - window].mean(axis=0, skipna=True).dropna()  # per group, over the window
        out["balance_cv"] = coefficient_of_variation(means.to_numpy())
        out["balance_groups"] = len(means)
        out["balance_floor"] = noise_floor_cv(len(means))
    else:
        out["balance_cv"], out["balance_groups"], out["balance_floor"] = math.nan, 0, math.nan
    if weight_stats:
        weights = wide(metrics, "daro/weight")
        ws = wide(metrics, "daro/wS")  # w * signal / C: 1 at the fixed point of the reading the run used
        wl = ws if len(ws) else wide(metrics, "daro/wL").abs()  # older runs: |w L|, the paper's reading
        if len(weights):
            final = weights.iloc[-1].dropna().to_numpy()
            out["weight_var"] = float(np.var(final)) if len(final) else math.nan
            out["weight_final"] = json.dumps({int(k): float(v) for k, v in weights.iloc[-1].dropna().items()})
            if len(wl):
                last = int(wl.index.max())
                win = wl[wl.index > last - window].to_numpy().ravel()
                win = win[np.isfinite(win)]
                out["balance_gap"] = float(np.mean(np.abs(win - 1.0))) if len(win) else math.nan
            else:
                out["balance_gap"] = math.nan
            bound = metrics[metrics.key == "daro/at_bound"].value
            hit = bool((bound > 0).any())
            if w_bounds is not None:
                lo, hi = w_bounds
                allw = weights.to_numpy().ravel()
                allw = allw[np.isfinite(allw)]
                hit = hit or bool(((allw <= lo * (1 + 1e-6)) | (allw >= hi * (1 - 1e-6))).any())
            out["at_bound"] = int(hit)
            watched = metrics[
                metrics.key.str.startswith(("daro/weight/", "daro/wL/", "daro/wS/")) | (metrics.key == LOSS_TOTAL)
            ]
            out["nonfinite"] = int(not np.isfinite(watched.value.to_numpy()).all())
        else:
            out.update(
                weight_var=math.nan, balance_gap=math.nan, at_bound=math.nan, nonfinite=math.nan, weight_final=""
            )
    return out


def area_under_curve(steps: np.ndarray, acc: np.ndarray) -> float:
    """Trapezoid area under acc(step) from the first to the last evaluation, over that many steps: the mean accuracy
    over training (NaN with fewer than two evaluations)."""
    ok = np.isfinite(steps) & np.isfinite(acc)
    steps, acc = steps[ok], acc[ok]
    if len(steps) < 2 or steps[-1] <= steps[0]:
        return math.nan
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def share_cv(by_k: pd.DataFrame, window: int) -> float:
    """CV across groups of each group's share of the summed |x| over the last `window` steps (`by_k`: steps x k,
    e.g. contrib or gradnorm); NaN without two groups."""
    if not len(by_k):
        return math.nan
    last = int(by_k.index.max())
    totals = by_k[by_k.index > last - window].abs().sum(axis=0, skipna=True)
    totals = totals[totals > 0]
    return coefficient_of_variation((totals / totals.sum()).to_numpy()) if len(totals) >= 2 else math.nan


def table_share_cvs(per_mu: pd.DataFrame, window: int) -> dict[str, float]:
    """The four share CVs (module docstring) from a per_mu table: over the rows of the last `window` steps, each
    group's summed |C - C_offset| and G, as shares across groups, per group and per prompt."""
    from daro_lab.record import normalise_per_mu

    pm = normalise_per_mu(per_mu)
    pm = pm[pm.step > pm.step.max() - window]
    out = {}
    c = pm["contrib"] - (pm["contrib_offset"].fillna(0.0) if "contrib_offset" in pm else 0.0)
    for name, x in (("c", c.abs()), ("g", pm["gradnorm"] if "gradnorm" in pm else None)):
        if x is None or x.notna().sum() == 0:
            out[f"{name}_share_cv"] = out[f"{name}_share_cv_prompt"] = math.nan
            continue
        rows = pm[x.notna()]
        total = x[x.notna()].groupby(rows.k).sum()
        prompts = rows.prompts.groupby(rows.k).sum() if "prompts" in rows else None
        for suffix, v in (("", total), ("_prompt", total / prompts if prompts is not None else None)):
            if v is None:
                out[f"{name}_share_cv{suffix}"] = math.nan
                continue
            v = v[(v > 0) & np.isfinite(v)]
            out[f"{name}_share_cv{suffix}"] = (
                coefficient_of_variation((v / v.sum()).to_numpy()) if len(v) >= 2 else math.nan
            )
    return out


def steps_to_target(metrics: pd.DataFrame, target: float, acc_key: str = ACC) -> tuple[float, bool]:
    """(step, reached): the first evaluation step (>= 1) with held-out accuracy >= target, or, when never
    reached, the last evaluation step (censored); (NaN, False) without a target or evaluations."""
    if target is None or not np.isfinite(target):
        return math.nan, False
    acc = metrics[(metrics.key == acc_key) & (metrics.step >= 1)].sort_values("step")
    hit = acc[acc.value >= target - 1e-12]
    if len(hit):
        return float(hit.step.iloc[0]), True
    return (float(acc.step.iloc[-1]) if len(acc) else math.nan), False


# --------------------------------------------------------------------------------------------
# Per arm


def summarize(
    per_seed: pd.DataFrame,
    arms: Sequence[str],
    reference: str,
    test: str = "t",
    weight_stats: bool = False,
    labels: dict[str, str] | None = None,
    methods: dict[str, str] | None = None,
    target: float = math.nan,
) -> pd.DataFrame:
    """One row per arm from the per-seed table (rows with status FINISHED count): n_seeds, failed,
    `<m>_mean`, `<m>_lo`, `<m>_hi` for each metric, `steps_to_target_reached` ('k/n'), and the
    paired test against `reference` (`<m>_diff`, `<m>_p`, `pairs`, `test`)."""
    labels, methods = labels or {}, methods or {}
    metrics = list(STAT_METRICS) + (list(WEIGHT_METRICS) if weight_stats else [])
    done = per_seed[per_seed.status == "FINISHED"] if len(per_seed) else per_seed
    ref = done[done.arm == reference].set_index("seed") if len(done) else pd.DataFrame()
    rows = []
    for arm in arms:
        all_rows = per_seed[per_seed.arm == arm] if len(per_seed) else per_seed
        d = done[done.arm == arm] if len(done) else done
        row: dict[str, Any] = {
            "arm": arm,
            "label": labels.get(arm, ""),
            "method": methods.get(arm, ""),
            "reference": arm == reference,
            "n_seeds": int(len(d)),
            "failed": int((all_rows.status == "FAILED").sum()) if len(all_rows) else 0,
            "not_run": int((~all_rows.status.isin(["FINISHED", "FAILED"])).sum()) if len(all_rows) else 0,
        }
        for m in metrics:
            vals = d[m].to_numpy(dtype=float) if m in d else np.array([])
            row[f"{m}_min"], row[f"{m}_max"] = seed_range(vals)
            if m == "steps_to_target":
                hit = d["reached"].to_numpy(dtype=float) if "reached" in d else np.zeros(len(vals))
                row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"], _ = km_ci(vals, hit)
                continue
            row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"], _ = mean_ci(vals)
        reached = d["reached"].to_numpy(dtype=float) if "reached" in d and len(d) else np.array([])
        n_reach = int(np.nansum(reached))
        row["steps_to_target_reached"] = f"{n_reach}/{len(d)}"
        row["steps_to_target_censored"] = bool(len(d) and n_reach < int(np.isfinite(d["steps_to_target"]).sum()))
        row["target_acc"] = target
        if weight_stats:
            for flag in ("at_bound", "nonfinite"):
                col = all_rows[flag].to_numpy(dtype=float) if flag in all_rows else np.array([])
                known = col[np.isfinite(col)]
                row[flag] = f"{int(known.sum())}/{len(known)}" if len(known) else "n/a"
        row["test"] = TEST_NAMES[test]
        pairs = 0
        source = d["balance_source"].iloc[0] if "balance_source" in d and len(d) else None
        ref_source = ref["balance_source"].iloc[0] if "balance_source" in ref and len(ref) else None
        row["balance_source"] = source
        for m in TESTED:
            row[f"{m}_diff"], row[f"{m}_p"], row[f"{m}_mdd"] = math.nan, math.nan, math.nan
            if arm == reference or ref.empty or not len(d) or m not in d or m not in ref:
                continue
            if m == "balance_cv" and source != ref_source:  # two different quantities: never tested
                continue
            mine = d.set_index("seed")[m]
            common = sorted(set(mine.index) & set(ref.index))
            a, b = mine.loc[common].to_numpy(dtype=float), ref.loc[common, m].to_numpy(dtype=float)
            diff, p, n = paired_test(a, b, test)
            row[f"{m}_diff"], row[f"{m}_p"], row[f"{m}_mdd"] = diff, p, paired_mdd(a, b)
            pairs = max(pairs, n)
        row["pairs"] = pairs
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(mean: float, lo: float, hi: float, digits: int | None = 3) -> str:
    """'0.512 [0.480, 0.540]'; digits None: 3 significant digits; no brackets without an interval."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    f = "{:.3g}" if digits is None else "{:.%df}" % digits
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def _fmt_p(diff: float, p: float, mdd: float = math.nan) -> str:
    if diff is None or not np.isfinite(diff):
        return "–"
    s = f"{diff:+.3f}"
    if not np.isfinite(p):
        return s + " (no p)"
    return s + f" (p={p:.3g}" + (f"; MDD {mdd:.3g})" if np.isfinite(mdd) else ")")


def _range(lo: float, hi: float, digits: int = 3) -> str:
    return f"{lo:.{digits}f}–{hi:.{digits}f}" if np.isfinite(lo) and np.isfinite(hi) else "n/a"


def verdict(row: pd.Series, alpha: float = 0.05) -> str:
    """One honest line on the arm's final accuracy against the reference, with the power to see a difference."""
    if row["reference"]:
        return "reference"
    if row["n_seeds"] == 0:
        return "no finished run"
    p, diff = row.get("final_acc_p", math.nan), row.get("final_acc_diff", math.nan)
    mdd = row.get("final_acc_mdd", math.nan)
    if not np.isfinite(diff):
        return "no paired seeds"
    if diff == 0 and p == 1.0 and not np.isfinite(mdd):
        return f"identical to the reference in all {int(row.get('pairs', 0))} paired seeds (nothing to test)"
    if not np.isfinite(p):
        return f"{'higher' if diff > 0 else 'lower' if diff < 0 else 'equal'} by {abs(diff):.3f}, untested (fewer than 2 paired seeds or zero variance)"
    if p < alpha:
        return f"{'higher' if diff > 0 else 'lower'} than the reference by {abs(diff):.3f} (p={p:.3g} < {alpha})"
    power = (
        f"no difference larger than {mdd:.3f} (the minimal detectable difference at 80% power with "
        f"{int(row.get('pairs', 0))} paired seeds)"
        if np.isfinite(mdd)
        else "no detectable difference"
    )
    return f"within noise of the reference (p={p:.3g}): {power}"


def display_table(summary: pd.DataFrame, bold: str = "**") -> pd.DataFrame:
    """The summary as shown: one row per arm, formatted cells (mean [95% t-CI], the seed range apart), the reference
    arm in `bold`."""
    ws = any(c.startswith("weight_var") for c in summary.columns)
    rows = []
    for _, r in summary.iterrows():
        arm = f"{bold}{r.arm}{bold}" if r.reference else r.arm
        if r.label:
            arm += f" ({r.label})"
        seeds = (
            str(r.n_seeds)
            + (f" ({r.failed} failed)" if r.failed else "")
            + (f" ({r.not_run} not run)" if r.not_run else "")
        )
        own = {"wS": "w·signal/C", "wL": "w·L", "C": "C_mu"}.get(r.get("balance_source"), "")
        row = {
            "arm": arm,
            "method": r.method,
            "seeds": seeds,
            "final acc [95% t-CI]": _fmt(r.final_acc_mean, r.final_acc_lo, r.final_acc_hi),
            "final acc, seed range": _range(r.get("final_acc_min", math.nan), r.get("final_acc_max", math.nan)),
            "AUC acc [95% t-CI]": _fmt(
                r.get("auc_acc_mean", math.nan), r.get("auc_acc_lo", math.nan), r.get("auc_acc_hi", math.nan)
            ),
            "steps to target (reached)": ("≥ " if r.get("steps_to_target_censored", False) else "")
            + _fmt(r.steps_to_target_mean, r.steps_to_target_lo, r.steps_to_target_hi, 1)
            + f" ({r.steps_to_target_reached})",
            "C share CV": _fmt(
                r.get("c_share_cv_mean", math.nan), r.get("c_share_cv_lo", math.nan), r.get("c_share_cv_hi", math.nan)
            ),
            "G share CV": _fmt(
                r.get("g_share_cv_mean", math.nan), r.get("g_share_cv_lo", math.nan), r.get("g_share_cv_hi", math.nan)
            ),
            "C / G share CV per prompt": _fmt(r.get("c_share_cv_prompt_mean", math.nan), math.nan, math.nan)
            + " / "
            + _fmt(r.get("g_share_cv_prompt_mean", math.nan), math.nan, math.nan),
            "own balance CV (of; noise floor)": _fmt(r.balance_cv_mean, r.balance_cv_lo, r.balance_cv_hi)
            + (f" ({own}; {r.balance_floor_mean:.2f})" if np.isfinite(r.get("balance_floor_mean", math.nan)) else ""),
        }
        if ws:
            row.update(
                {
                    "weight var": _fmt(r.weight_var_mean, r.weight_var_lo, r.weight_var_hi, None),
                    "balance gap": _fmt(r.balance_gap_mean, r.balance_gap_lo, r.balance_gap_hi),
                    "at bound": str(r.at_bound),
                    "non-finite": str(r.nonfinite),
                }
            )
        row["Δ final acc vs ref"] = _fmt_p(r.final_acc_diff, r.final_acc_p, r.get("final_acc_mdd", math.nan))
        row["Δ AUC vs ref"] = _fmt_p(
            r.get("auc_acc_diff", math.nan), r.get("auc_acc_p", math.nan), r.get("auc_acc_mdd", math.nan)
        )
        row["Δ C share CV vs ref"] = _fmt_p(
            r.get("c_share_cv_diff", math.nan), r.get("c_share_cv_p", math.nan), r.get("c_share_cv_mdd", math.nan)
        )
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The summary as a Markdown document: a table and the notes needed to read it."""
    ws = any(c.startswith("weight_var") for c in summary.columns)
    lines = [f"# Ablation `{meta.get('name', '')}`", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    lines += [
        f"Parent run `{meta.get('parent_run_id', '')}`, experiment `{meta.get('experiment', '')}`, preset "
        f"`{meta.get('preset', '')}`, seeds {meta.get('seeds', '')}, reference arm `{meta.get('reference', '')}`.",
        "",
    ]
    disp = display_table(summary)
    lines += ["| " + " | ".join(disp.columns) + " |", "|" + "---|" * len(disp.columns)]
    for _, r in disp.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r) + " |")
    lines += ["", "**Verdicts (final held-out accuracy against the reference):**", ""]
    for _, r in summary.iterrows():
        lines.append(f"- `{r.arm}`: {verdict(r)}")
    target = meta.get("target_acc")
    tdesc = f"{target:.3f}" if isinstance(target, float) and np.isfinite(target) else "n/a"
    lines += [
        "",
        "How to read it:",
        "",
        f"- Accuracy: {_acc_words(meta.get('accuracy', 'greedy'))}; *final* at the last evaluation, *best* over the evaluations after "
        "step 0. Mean over seeds with a 95% t-interval of the mean in brackets (none with one seed); the seed range "
        "(min–max over seeds) is shown apart: it is the seeds' spread, not an interval for the mean.",
        "- AUC acc: the area under each run's accuracy curve from step 0 to its last evaluation, over that many "
        "steps (the mean accuracy over training): convergence speed without a target.",
        f"- Steps to target: first evaluation step with accuracy >= {tdesc} ({meta.get('target_desc', '')}); "
        "Kaplan-Meier restricted mean over seeds, a seed that never reached it counting up to its last evaluation "
        "(censored, never dropped): '≥' marks a mean with censored seeds, which the true mean exceeds; "
        "(reached/finished) beside it; resolved to the evaluation interval; an interval only from 5 seeds (a "
        "bootstrap of fewer is their range).",
        f"- C share CV, G share CV: each pass-rate group's share of the summed |C_mu| (loss contribution) or G_mu "
        f"(||grad C_mu||) over the last {meta.get('balance_window', '')} steps, then the coefficient of variation of "
        "the shares across groups (0 = equal shares). Comparable across all arms.",
        "- Own balance CV: each method's own balance quantity, per group over the same window: w_mu·signal_mu/C on "
        "DARO's code path (1 at the fixed point of the weights' update, where learned weights put it by construction: "
        "a convergence check of the weights, not evidence) or C_mu (other methods); the CV across groups, with the "
        "noise floor of zero-mean noise. Tested only between arms with the same quantity.",
        f"- Δ vs ref: mean over seeds of (arm − reference), paired by seed; p from the two-sided "
        f"{TEST_NAMES.get(meta.get('test', 't'), '')} over the paired seeds; MDD: the smallest difference a paired "
        "t-test on these pairs detects with 80% power at alpha 0.05 (from the pairs' sd): a p above 0.05 means no "
        "difference larger than the MDD, not no difference; 'no p' with fewer than two pairs.",
    ]
    if ws:
        lines.append(
            "- Weight var: variance across groups of the final weights; balance gap: mean distance of "
            "w_mu·signal_mu/C from DARO's fixed point 1 over the last window (|w_mu·L_mu| for runs older than the "
            "signal's record); at bound / non-finite: seeds with a "
            "weight on w_min/w_max at any step / with a NaN or inf (including a run that failed on one)."
        )
    if meta.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"
