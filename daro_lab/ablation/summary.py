"""The statistical summary of an ablation: per arm, mean and 95% CI over seeds, and a paired test
against the reference arm. Everything is read back from what the child runs logged in MLflow.

Per child run (table `per_seed`, one row per arm and seed):
- `final_acc`: held-out accuracy at the last evaluation: greedy (`eval/greedy_acc`) or, with the grid's
  `accuracy = "sampled"`, the mean reward of `trainer.eval_samples` samples per prompt at the rollout
  temperature (`eval/sampled_acc`, avg@n: what training optimises);
- `best_acc`: the best of the evaluations after the start (step >= 1; step 0 is the starting policy,
  the same convention as analyses.report);
- `steps_to_target`: the first evaluation step whose accuracy is >= the target (the grid's
  `target_acc`, or by default the reference arm's mean final accuracy), with `reached` 1; a seed that
  never reaches it is censored at its last evaluation step (`reached` 0), never dropped. Evaluations
  happen every `trainer.eval_every` steps, so this is resolved only to that grid;
- `balance_cv`: loss-balance spread. For each pass-rate group, the mean over the last `balance_window`
  training steps of its balance quantity x_mu: DARO's w_mu * signal_mu / C (metric `daro/wS/mu_k`, 1 at
  its fixed point; older runs: w_mu * L_mu, `daro/wL/mu_k`) on DARO's code path (methods daro and
  static), the group's contribution C_mu (metric `contrib/mu_k`) for every other method. Then the
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

Per arm (table `summary`): for each of these, the mean over seeds and a 95% bootstrap CI of the
mean (scipy.stats.bootstrap, percentile method, 9999 resamples, fixed seed); with one seed there is
no CI (NaN), never a made-up one. Steps to target is a Kaplan-Meier restricted mean over the seeds
(censored seeds count up to their last evaluation), shown with '>=' when a seed was censored, since
the true mean is then larger; its CI bootstraps that statistic over seeds. With very few seeds a bootstrap CI is narrow (with 3 seeds only
10 distinct resampled means exist): read it with the seed count beside it. Paired test against the
reference arm, pairing runs by seed: the paired t-test (scipy.stats.ttest_rel, two-sided) or the
Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for small n; it cannot reach p < 0.05 with
fewer than 6 pairs); the column `test` names it. `<metric>_diff` is the mean of arm minus reference
over the pairs. Fewer than two pairs: no p-value.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from daro_lab.record import wide

ACC = "eval/greedy_acc"
ACC_KEYS = {"greedy": "eval/greedy_acc", "sampled": "eval/sampled_acc"}  # the grid's `accuracy`
STAT_METRICS = ("final_acc", "best_acc", "steps_to_target", "balance_cv", "balance_floor")
WEIGHT_METRICS = ("weight_var", "balance_gap")
TESTED = ("final_acc", "best_acc", "balance_cv")
TEST_NAMES = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank"}


# --------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: Sequence[float], level: float = 0.95, n_resamples: int = 9999,
            seed: int = 0) -> tuple[float, float, float, int]:
    """(mean, CI low, CI high, n) over the finite values: a bootstrap percentile interval of the
    mean. n = 1: (v, NaN, NaN, 1), no interval. All values equal: the interval is that value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if n == 1:
        return m, math.nan, math.nan, 1
    if np.ptp(v) == 0:
        return m, m, m, n
    from scipy import stats

    res = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed), vectorized=True)
    return m, float(res.confidence_interval.low), float(res.confidence_interval.high), n


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


def km_ci(times: Sequence[float], reached: Sequence[bool], level: float = 0.95, n_resamples: int = 9999,
          seed: int = 0) -> tuple[float, float, float, int]:
    """(restricted mean, CI low, CI high, n): a bootstrap percentile interval over seeds (as mean_ci)."""
    t = np.asarray(times, dtype=float)
    e = np.asarray(reached, dtype=float)
    ok = np.isfinite(t)
    t, e = t[ok], e[ok]
    n = len(t)
    m = km_restricted_mean(t, e.astype(bool))
    if n < 2:
        return m, math.nan, math.nan, n
    if np.ptp(t) == 0 and np.ptp(e) == 0:
        return m, m, m, n
    from scipy import stats

    res = stats.bootstrap((t, e), lambda a, b: km_restricted_mean(a, b.astype(bool)), paired=True,
                          vectorized=False, confidence_level=level, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    return m, float(res.confidence_interval.low), float(res.confidence_interval.high), n


# --------------------------------------------------------------------------------------------
# Per run


def run_stats(metrics: pd.DataFrame, method: str, window: int, weight_stats: bool = False,
              w_bounds: tuple[float, float] | None = None, acc_key: str = ACC) -> dict[str, Any]:
    """The per-run numbers of the module docstring from a run's `read_metrics` frame (except
    steps_to_target, which needs the target: see `steps_to_target`)."""
    out: dict[str, Any] = {}
    acc = metrics[metrics.key == acc_key].sort_values("step")
    out["start_acc"] = float(acc.value[acc.step == 0].iloc[0]) if (acc.step == 0).any() else math.nan
    out["final_acc"] = float(acc.value.iloc[-1]) if len(acc) else math.nan
    later = acc[acc.step >= 1]
    out["best_acc"] = float(later.value.max()) if len(later) else math.nan
    out["final_step"] = int(acc.step.iloc[-1]) if len(acc) else -1
    from daro_lab.algorithms import METHODS

    if method in METHODS and METHODS[method].daro_path:
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
            watched = metrics[metrics.key.str.startswith(("daro/weight/", "daro/wL/", "daro/wS/"))
                              | (metrics.key == "loss/total")]
            out["nonfinite"] = int(not np.isfinite(watched.value.to_numpy()).all())
        else:
            out.update(weight_var=math.nan, balance_gap=math.nan, at_bound=math.nan, nonfinite=math.nan,
                       weight_final="")
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


def summarize(per_seed: pd.DataFrame, arms: Sequence[str], reference: str, test: str = "t",
              weight_stats: bool = False, labels: dict[str, str] | None = None,
              methods: dict[str, str] | None = None, target: float = math.nan) -> pd.DataFrame:
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
        row: dict[str, Any] = {"arm": arm, "label": labels.get(arm, ""), "method": methods.get(arm, ""),
                               "reference": arm == reference, "n_seeds": int(len(d)),
                               "failed": int((all_rows.status == "FAILED").sum()) if len(all_rows) else 0,
                               "not_run": int((~all_rows.status.isin(["FINISHED", "FAILED"])).sum()) if len(all_rows) else 0}
        for m in metrics:
            vals = d[m].to_numpy(dtype=float) if m in d else np.array([])
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
        for m in TESTED:
            if arm == reference or ref.empty or not len(d):
                row[f"{m}_diff"], row[f"{m}_p"] = math.nan, math.nan
                continue
            mine = d.set_index("seed")[m]
            common = sorted(set(mine.index) & set(ref.index))
            diff, p, n = paired_test(mine.loc[common].to_numpy(dtype=float),
                                     ref.loc[common, m].to_numpy(dtype=float), test)
            row[f"{m}_diff"], row[f"{m}_p"] = diff, p
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


def _fmt_p(diff: float, p: float) -> str:
    if diff is None or not np.isfinite(diff):
        return "–"
    s = f"{diff:+.3f}"
    return s + (f" (p={p:.3g})" if np.isfinite(p) else " (no p)")


def verdict(row: pd.Series, alpha: float = 0.05) -> str:
    """One honest line on the arm's final accuracy against the reference."""
    if row["reference"]:
        return "reference"
    if row["n_seeds"] == 0:
        return "no finished run"
    p, diff = row.get("final_acc_p", math.nan), row.get("final_acc_diff", math.nan)
    if not np.isfinite(diff):
        return "no paired seeds"
    if not np.isfinite(p):
        return f"{'higher' if diff > 0 else 'lower' if diff < 0 else 'equal'} by {abs(diff):.3f}, untested (fewer than 2 paired seeds or zero variance)"
    if p < alpha:
        return f"{'higher' if diff > 0 else 'lower'} than the reference (p={p:.3g} < {alpha})"
    return f"within noise of the reference (p={p:.3g})"


def display_table(summary: pd.DataFrame, bold: str = "**") -> pd.DataFrame:
    """The summary as shown: one row per arm, formatted cells (mean [95% CI]), the reference arm in `bold`."""
    ws = any(c.startswith("weight_var") for c in summary.columns)
    rows = []
    for _, r in summary.iterrows():
        arm = f"{bold}{r.arm}{bold}" if r.reference else r.arm
        if r.label:
            arm += f" ({r.label})"
        seeds = str(r.n_seeds) + (f" ({r.failed} failed)" if r.failed else "") + (f" ({r.not_run} not run)" if r.not_run else "")
        row = {"arm": arm, "method": r.method, "seeds": seeds,
               "final acc": _fmt(r.final_acc_mean, r.final_acc_lo, r.final_acc_hi),
               "best acc": _fmt(r.best_acc_mean, r.best_acc_lo, r.best_acc_hi),
               "steps to target (reached)": ("≥ " if r.get("steps_to_target_censored", False) else "")
               + _fmt(r.steps_to_target_mean, r.steps_to_target_lo, r.steps_to_target_hi, 1)
               + f" ({r.steps_to_target_reached})",
               "balance CV (noise floor)": _fmt(r.balance_cv_mean, r.balance_cv_lo, r.balance_cv_hi)
               + (f" ({r.balance_floor_mean:.2f})" if np.isfinite(r.get("balance_floor_mean", math.nan)) else "")}
        if ws:
            row.update({"weight var": _fmt(r.weight_var_mean, r.weight_var_lo, r.weight_var_hi, None),
                        "balance gap": _fmt(r.balance_gap_mean, r.balance_gap_lo, r.balance_gap_hi),
                        "at bound": str(r.at_bound), "non-finite": str(r.nonfinite)})
        row["Δ final acc vs ref"] = _fmt_p(r.final_acc_diff, r.final_acc_p)
        row["Δ balance CV vs ref"] = _fmt_p(r.balance_cv_diff, r.balance_cv_p)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The summary as a Markdown document: a table and the notes needed to read it."""
    ws = any(c.startswith("weight_var") for c in summary.columns)
    lines = [f"# Ablation `{meta.get('name', '')}`", ""]
    if meta.get("description"):
        lines += [meta["description"].strip(), ""]
    lines += [f"Parent run `{meta.get('parent_run_id', '')}`, experiment `{meta.get('experiment', '')}`, preset "
              f"`{meta.get('preset', '')}`, seeds {meta.get('seeds', '')}, reference arm `{meta.get('reference', '')}`.", ""]
    disp = display_table(summary)
    lines += ["| " + " | ".join(disp.columns) + " |", "|" + "---|" * len(disp.columns)]
    for _, r in disp.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r) + " |")
    lines += ["", "**Verdicts (final held-out accuracy against the reference):**", ""]
    for _, r in summary.iterrows():
        lines.append(f"- `{r.arm}`: {verdict(r)}")
    target = meta.get("target_acc")
    tdesc = (f"{target:.3f}" if isinstance(target, float) and np.isfinite(target) else "n/a")
    lines += [
        "",
        "How to read it:",
        "",
        f"- Accuracy: {meta.get('accuracy', 'greedy')} held-out accuracy; *final* at the last evaluation, *best* over the evaluations after "
        "step 0. Mean over seeds with a 95% bootstrap percentile CI of the mean in brackets; no brackets with one "
        "seed (no interval is possible). With few seeds the bootstrap CI is optimistic.",
        f"- Steps to target: first evaluation step with accuracy >= {tdesc} ({meta.get('target_desc', '')}); "
        "Kaplan-Meier restricted mean over seeds, a seed that never reached it counting up to its last evaluation "
        "(censored, never dropped): '≥' marks a mean with censored seeds, which the true mean exceeds; "
        "(reached/finished) beside it; resolved to the evaluation interval.",
        f"- Balance CV: per pass-rate group, the mean over the last {meta.get('balance_window', '')} steps of "
        "w_mu·signal_mu/C (DARO's code path: 1 at its fixed point) or of C_mu (other methods); then the coefficient "
        "of variation of their absolute values across the groups; 0 = every group contributes the same. In "
        "brackets, its noise floor: the CV the same number of groups gives when the quantity is zero-mean noise; "
        "a balance CV near it carries no balance information. The two sources are not the same quantity: "
        "compare it within one method family.",
        f"- Δ vs ref: mean over seeds of (arm − reference), paired by seed; p from the two-sided "
        f"{TEST_NAMES.get(meta.get('test', 't'), '')} over the paired seeds; 'no p' with fewer than two pairs.",
    ]
    if ws:
        lines.append("- Weight var: variance across groups of the final weights; balance gap: mean distance of "
                     "w_mu·signal_mu/C from DARO's fixed point 1 over the last window (|w_mu·L_mu| for runs older than the "
                     "signal's record); at bound / non-finite: seeds with a "
                     "weight on w_min/w_max at any step / with a NaN or inf (including a run that failed on one).")
    if meta.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"
