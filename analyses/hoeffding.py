"""Figure and check `hoeffding`: does a response's token-mean of the clipped factor g stay within
Hoeffding's bound of its group's mean, as the factorised (unified) view of the loss assumes?

What is measured (docs/math.md, section 5), from each run's `hoeffding` table (one row per
response of the off-policy mini-batches, index >= 1: on the first one rho = 1 exactly):

- g_t = min(rho_t, 1 + eps_high) in [0, 1 + eps_high] where A > 0, and max(rho_t, 1 - eps_low) in
  [1 - eps_low, b] where A < 0, with b the dual-clip constant or, without one, the 99th percentile of the
  per-response largest ratio over the run's negative-advantage responses (not the single largest ratio,
  which one outlier would set); the share of those responses whose ratio exceeds b, for which g is not
  bounded by b, is reported.
- d_i = |mean_t g_{i,t} - group mean|, the group being the responses with the same k and sign of
  A in the same mini-batch; groups of one response (d = 0 by construction) are left out.
- Hoeffding for n independent tokens in [a, b]: P(d >= tau) <= 2 exp(-2 n tau^2 / (b - a)^2).
  * tail: the empirical P(d >= tau) against the bound averaged over the responses, as a function of
    t = tau / (b - a), per response-length bin;
  * coverage: the share of responses with d < tau_delta(n) = (b - a) sqrt(ln(2/delta) / (2 n)),
    which the bound promises to be at least 1 - delta, for delta in {0.01, 0.05, 0.1};
  * the factorised loss: per group (step, mini-batch, k), the token-mean loss with each response's
    mean g (exact: -sum_i A_i n_i g_i / sum_i n_i) against the same with g_i replaced by its group
    mean; relative error |exact - factorised| / |exact|, and the error relative to the group's loss
    mass sum_i |A_i| n_i g_i / sum_i n_i (well defined when the exact loss is near 0).

Honesty, both ways. Tokens of one response are not independent and the group mean stands in for
E g, so the check assumes neither answer. Only responses of at least `min_tokens` tokens are tested
(default 8: shorter ones have a band wider than half of g's range at delta = 0.05, which almost any
deviation satisfies); the others are counted and left out. A scope is "vacuous" when it has no tested
response, or when the bound is >= 1 at every observed deviation (every response's deviation is below
sqrt(ln 2 / 2n) of the range): then no observation could have contradicted the bound, and its coverage
is not evidence for it. Otherwise, with [lo, hi] the 95% Clopper-Pearson interval of the measured
coverage, the verdict at delta is "holds" when lo >= 1 - delta (the promise is met beyond sampling
noise), "fails" when hi < 1 - delta (it is broken beyond sampling noise), "consistent" when the
coverage is at least 1 - delta but too few responses establish it, and "inconclusive" when it falls
short within sampling noise. A failure says the premise of the factorisation does not hold in these
runs; it cannot say whether token dependence or differences between the prompts of one group is the
cause. A pass is evidence for these runs, not a proof.

Tables: `hoeffding_coverage.csv` (main), `hoeffding_tail.csv`, `hoeffding_factorisation.csv`,
`hoeffding_ranges.csv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure

NAME = "hoeffding"
DELTAS = (0.01, 0.05, 0.1)
CONFIDENCE = 0.95  # of the Clopper-Pearson intervals behind the verdicts
EXACT = 1e-9  # errors below this are rounding: the factorised loss equals the exact one
MIN_TOKENS = 8  # shortest response tested: at 8 tokens the band at delta = 0.05 is 0.48 of g's range
B_QUANTILE = 0.99  # without a dual clip, b for A < 0 is this quantile of the per-response largest ratio


@dataclass
class HoeffdingCheck:
    """The outcome of `hoeffding_check`: tables, per-delta verdicts and a plain-text verdict."""

    responses: pd.DataFrame  # one row per response used: n, a, b, width, d, t = d / width
    tail: pd.DataFrame  # length_bin, t, tau-free: empirical, bound, responses, cp_low, exceeds, significant
    coverage: pd.DataFrame  # scope ('all', 'length', 'sign', 'method'), group, delta, coverage, ...
    factorisation: pd.DataFrame  # one row per group (step, minibatch, k): exact, factorised, errors
    ranges: pd.DataFrame  # per run and sign: a, b, and where b came from
    verdicts: dict[float, str] = field(default_factory=dict)  # delta -> holds|fails|consistent|inconclusive|vacuous
    excluded_singletons: int = 0
    excluded_short: int = 0  # responses below min_tokens, not tested
    min_tokens: int = MIN_TOKENS
    text: str = ""

    @property
    def holds(self) -> bool:
        """True when the coverage holds at every delta, beyond sampling noise."""
        return all(v == "holds" for v in self.verdicts.values())

    @property
    def fails(self) -> bool:
        """True when the coverage fails significantly at some delta."""
        return any(v == "fails" for v in self.verdicts.values())

    @property
    def tail_exceeds(self) -> bool:
        """True when the measured tail exceeds the bound beyond sampling noise at some (tau, length) point."""
        return bool(len(self.tail) and self.tail.significant.any())

    @property
    def vacuous(self) -> bool:
        """True when no observation could have contradicted the bound (see the module docstring)."""
        return bool(self.verdicts) and all(v == "vacuous" for v in self.verdicts.values())


def clopper_pearson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial proportion."""
    from scipy import stats

    if n == 0:
        return math.nan, math.nan
    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return lo, hi


def hoeffding_bound(t: np.ndarray | float, n: np.ndarray | float) -> np.ndarray:
    """min(1, 2 exp(-2 n t^2)) with t = tau / (b - a): Hoeffding's two-sided tail bound."""
    return np.minimum(1.0, 2.0 * np.exp(-2.0 * np.asarray(n, float) * np.asarray(t, float) ** 2))


def tau_delta(n: np.ndarray | float, delta: float) -> np.ndarray:
    """The half-width, in units of b - a, that Hoeffding gives at confidence 1 - delta."""
    return np.sqrt(np.log(2.0 / delta) / (2.0 * np.asarray(n, float)))


def _ranges(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add a, b, width to every row; one row per (run, sign) describing the range."""
    df = df.copy()
    pos = df.sign > 0
    df["a"] = np.where(pos, 0.0, 1.0 - df.eps_low)
    b_neg = pd.Series(np.nan, index=df.index)
    rows = []
    for run_id, d in df.groupby("run_id", sort=False):
        neg = d[d.sign < 0]
        dual = d.dual_clip.dropna()
        over = math.nan
        if len(dual):
            b, src = float(dual.iloc[0]), "dual-clip constant"
        elif len(neg):
            b = float(max(neg.rho_max.quantile(B_QUANTILE), 1.0 - neg.eps_low.iloc[0]))
            src = f"{B_QUANTILE:.0%} quantile of the per-response largest ratio (no dual clip)"
        else:
            b, src = math.nan, "no negative-advantage responses"
        if len(neg):
            over = float((neg.rho_max > b).mean())
        b_neg[d.index] = b
        if (d.sign > 0).any():
            rows.append(
                {
                    "run_id": run_id,
                    "sign": "+",
                    "a": 0.0,
                    "b": 1.0 + float(d.eps_high.iloc[0]),
                    "b_source": "1 + eps_high",
                    "responses": int((d.sign > 0).sum()),
                }
            )
        if len(neg):
            rows.append(
                {
                    "run_id": run_id,
                    "sign": "-",
                    "a": 1.0 - float(neg.eps_low.iloc[0]),
                    "b": b,
                    "b_source": src,
                    "responses": len(neg),
                    "share_above_b": over,
                }
            )
    df["b"] = np.where(pos, 1.0 + df.eps_high, b_neg)
    df["width"] = df.b - df.a
    return df, pd.DataFrame(rows, columns=["run_id", "sign", "a", "b", "b_source", "responses", "share_above_b"])


def _length_bins(n: pd.Series, n_bins: int) -> pd.Series:
    """Label each response with a length range ('n 3–5'), quantile bins with integer edges."""
    n = n.astype(int)
    uniq = np.sort(n.unique())
    if len(uniq) <= n_bins:
        edges = [(u, u) for u in uniq]
    else:
        qs = np.quantile(n, np.linspace(0, 1, n_bins + 1))
        cuts = sorted(set(int(math.ceil(q)) for q in qs[1:-1]))
        lows = [int(uniq[0])] + [c for c in cuts if c > uniq[0]]
        edges = []
        for i, lo in enumerate(lows):
            hi = lows[i + 1] - 1 if i + 1 < len(lows) else int(uniq[-1])
            if hi >= lo and ((n >= lo) & (n <= hi)).any():
                edges.append((lo, hi))
    labels = pd.Series("", index=n.index, dtype=object)
    for lo, hi in edges:
        labels[(n >= lo) & (n <= hi)] = f"n={lo}" if lo == hi else f"n={lo}–{hi}"
    return labels


def _verdict(covered: int, total: int, delta: float, informative: bool = True) -> tuple[str, float, float]:
    """(verdict, CI low, CI high): vacuous, holds, fails, consistent or inconclusive (module docstring).
    informative: some tested response's deviation is large enough for the bound to be below 1 there."""
    lo, hi = clopper_pearson(covered, total)
    if total == 0 or not informative:
        return "vacuous", lo, hi
    if lo >= 1 - delta:
        return "holds", lo, hi
    if hi < 1 - delta:
        return "fails", lo, hi
    return ("consistent" if covered / total >= 1 - delta else "inconclusive"), lo, hi


def hoeffding_check(
    table: pd.DataFrame,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    deltas: Sequence[float] = DELTAS,
    n_bins: int = 4,
    t_grid: Sequence[float] | None = None,
    min_tokens: int = MIN_TOKENS,
) -> HoeffdingCheck:
    """Run the check on rows of `hoeffding` tables (columns step, minibatch, k, sign, adv, length,
    g_mean, g_group_mean, rho_max; optional run_id, method, and per-row eps_low, eps_high, dual_clip
    that override the arguments)."""
    need = {"step", "minibatch", "k", "sign", "adv", "length", "g_mean", "g_group_mean", "rho_max"}
    missing = need - set(table.columns)
    if missing:
        raise AnalysisError(f"{NAME}: the hoeffding table lacks columns {', '.join(sorted(missing))}")
    df = table[(table.sign != 0) & (table.length > 0)].copy()
    if df.empty:
        raise AnalysisError(f"{NAME}: no responses with a non-zero advantage in the hoeffding table")
    for col, default in (("eps_low", eps_low), ("eps_high", eps_high), ("dual_clip", dual_clip)):
        if col not in df.columns:
            df[col] = default if default is not None else np.nan
    if "run_id" not in df.columns:
        df["run_id"] = "run"
    if "method" not in df.columns:
        df["method"] = ""
    keys = ["run_id", "step", "minibatch", "k", "sign"]
    df["group_size"] = df.groupby(keys).g_mean.transform("size")
    fact = _factorisation(df)
    singletons = int((df.group_size < 2).sum())
    df = df[df.group_size >= 2]
    if df.empty:
        raise AnalysisError(f"{NAME}: every (k, sign of A) group has a single response; no deviation to measure")
    df, ranges = _ranges(df)
    df["n"] = df.length.astype(float)
    df["d"] = (df.g_mean - df.g_group_mean).abs()
    ok = df.width > 0
    df["t"] = np.where(ok, df.d / df.width.where(ok, 1.0), 0.0)  # zero width: g constant, d = 0
    short = df.n < min_tokens
    excluded_short = int(short.sum())
    if short.all():  # nothing to test: every verdict is vacuous
        check = HoeffdingCheck(
            df,
            pd.DataFrame(
                columns=["length_bin", "t", "empirical", "bound", "responses", "cp_low", "exceeds", "significant"]
            ),
            pd.DataFrame(
                columns=[
                    "scope",
                    "group",
                    "delta",
                    "required",
                    "coverage",
                    "responses",
                    "covered",
                    "cp_low",
                    "cp_high",
                    "verdict",
                    "n_min",
                    "n_max",
                ]
            ),
            fact,
            ranges,
            {d: "vacuous" for d in deltas},
            singletons,
            excluded_short,
            min_tokens,
        )
        check.text = (
            f"Hoeffding check: VACUOUS. All {len(df)} responses are shorter than {min_tokens} tokens, where "
            "the bound's band is too wide for any deviation to contradict it."
        )
        return check
    df = df[~short]
    df["length_bin"] = _length_bins(df.n, n_bins)
    # the bound is below 1 at a response's observed deviation: an observation there could contradict it
    df["informative"] = hoeffding_bound(df.t, df.n) < 1.0
    for delta in deltas:
        df[f"covered_{delta:g}"] = (df.t < tau_delta(df.n, delta)) | ~ok

    # coverage, overall and by length bin, sign and method
    cov_rows = []
    scopes = [
        ("all", pd.Series("all", index=df.index)),
        ("length", df.length_bin),
        ("sign", df.sign.map({1: "A>0", -1: "A<0"})),
        ("method", df.method),
    ]
    for scope, labels in scopes:
        if scope == "method" and (labels == "").all():
            continue
        for group in _ordered(labels, df.n):
            sel = labels == group
            for delta in deltas:
                c = int(df.loc[sel, f"covered_{delta:g}"].sum())
                m = int(sel.sum())
                verdict, lo, hi = _verdict(c, m, delta, bool(df.loc[sel, "informative"].any()))
                cov_rows.append(
                    {
                        "scope": scope,
                        "group": group,
                        "delta": delta,
                        "required": 1 - delta,
                        "coverage": c / m if m else math.nan,
                        "responses": m,
                        "covered": c,
                        "cp_low": lo,
                        "cp_high": hi,
                        "verdict": verdict,
                        "n_min": int(df.loc[sel, "n"].min()),
                        "n_max": int(df.loc[sel, "n"].max()),
                    }
                )
    coverage = pd.DataFrame(cov_rows)

    # the tail as a function of t = tau / (b - a), per length bin
    if t_grid is None:
        # far enough for the bound of a typical response to fall below 0.01
        top = float(min(1.0, max(0.1, df.t.max() * 1.15, float(tau_delta(df.n.median(), 0.01)) * 1.1)))
        t_grid = np.linspace(top / 40, top, 40)
    tail_rows = []
    for group in _ordered(df.length_bin, df.n):
        sel = df[df.length_bin == group]
        m = len(sel)
        for t in t_grid:
            cnt = int((sel.t >= t).sum())
            bound = float(hoeffding_bound(t, sel.n).mean())
            lo, _ = clopper_pearson(cnt, m)
            tail_rows.append(
                {
                    "length_bin": group,
                    "t": float(t),
                    "empirical": cnt / m,
                    "bound": bound,
                    "responses": m,
                    "cp_low": lo,
                    "exceeds": cnt / m > bound,
                    "significant": lo > bound,
                }
            )
    tail = pd.DataFrame(tail_rows)
    verdicts = {d: coverage[(coverage.scope == "all") & (coverage.delta == d)].verdict.iloc[0] for d in deltas}
    check = HoeffdingCheck(df, tail, coverage, fact, ranges, verdicts, singletons, excluded_short, min_tokens)
    check.text = _verdict_text(check, deltas)
    return check


def _ordered(labels: pd.Series, n: pd.Series) -> list[str]:
    """Group labels ordered by the shortest response length in each."""
    return list(n.groupby(labels).min().sort_values(kind="stable").index)


def _factorisation(df: pd.DataFrame) -> pd.DataFrame:
    """Exact and factorised token-mean loss of each group (run, step, mini-batch, k)."""
    d = df.assign(an=df.adv * df.length, absn=df.adv.abs() * df.length)
    d["exact_part"] = -d.an * d.g_mean
    d["fact_part"] = -d.an * d.g_group_mean
    d["mass_part"] = d.absn * d.g_mean
    g = d.groupby(["run_id", "method", "step", "minibatch", "k"], sort=True)
    out = g[["exact_part", "fact_part", "mass_part", "length"]].sum()
    out["responses"] = g.size()
    out = out.reset_index()
    out["exact"] = out.exact_part / out.length
    out["factorised"] = out.fact_part / out.length
    out["mass"] = out.mass_part / out.length
    out["abs_err"] = (out.exact - out.factorised).abs()
    out["rel_err"] = out.abs_err / out.exact.abs().where(out.exact.abs() > 1e-12)
    out["err_vs_mass"] = out.abs_err / out.mass.where(out.mass > 0)
    return out[
        [
            "run_id",
            "method",
            "step",
            "minibatch",
            "k",
            "responses",
            "length",
            "exact",
            "factorised",
            "abs_err",
            "rel_err",
            "mass",
            "err_vs_mass",
        ]
    ].rename(columns={"length": "tokens"})


def _verdict_text(c: HoeffdingCheck, deltas: Sequence[float]) -> str:
    df, cov = c.responses, c.coverage
    n_mb = df.groupby(["run_id", "step", "minibatch"]).ngroups
    lines = [
        f"Hoeffding check on {len(df)} responses from {n_mb} off-policy mini-batches "
        f"(lengths {int(df.n.min())}–{int(df.n.max())} tokens; {c.excluded_singletons} "
        f"response{'' if c.excluded_singletons == 1 else 's'} alone in their (k, sign of A) group and "
        f"{c.excluded_short} shorter than {c.min_tokens} tokens left out)."
    ]
    parts = []
    for d in deltas:
        r = cov[(cov.scope == "all") & (cov.delta == d)].iloc[0]
        parts.append(
            f"δ={d:g}: {r.coverage:.1%} within the bound (needs ≥ {1 - d:.0%}; 95% CI "
            f"{r.cp_low:.1%}–{r.cp_high:.1%}): {r.verdict.upper()}"
        )
    lines.append("Coverage of the 1−δ band: " + "; ".join(parts) + ".")
    mid = 0.05 if 0.05 in deltas else deltas[len(deltas) // 2]
    by_len = cov[(cov.scope == "length") & (cov.delta == mid)]

    def which(verdict):
        return [g for g, v in zip(by_len.group, by_len.verdict) if v == verdict]

    lines.append(
        f"By response length at δ={mid:g}: the bound holds for {', '.join(which('holds')) or 'no length'}"
        + (f"; it fails for {', '.join(which('fails'))}" if which("fails") else "; it fails for no length")
        + (
            f"; consistent with it but too few responses to establish it for {', '.join(which('consistent'))}"
            if which("consistent")
            else ""
        )
        + (
            f"; short of it within sampling noise for {', '.join(which('inconclusive'))}"
            if which("inconclusive")
            else ""
        )
        + (
            f"; vacuous (the bound ≥ 1 at every observed deviation) for {', '.join(which('vacuous'))}"
            if which("vacuous")
            else ""
        )
        + "."
    )
    by_sign = cov[(cov.scope == "sign") & (cov.delta == mid)]
    if len(by_sign):
        lines.append(
            "By sign of the advantage at δ="
            + f"{mid:g}: "
            + "; ".join(f"{g}: {cv:.1%} ({v})" for g, cv, v in zip(by_sign.group, by_sign.coverage, by_sign.verdict))
            + "."
        )
    t = c.tail
    lines.append(
        f"Tail: the empirical P(|ḡ_i − ḡ| ≥ τ) exceeds the bound at {int(t.exceeds.sum())} of {len(t)} "
        f"(τ, length) points, beyond sampling noise (95% Clopper–Pearson) at {int(t.significant.sum())}."
    )
    f = c.factorisation
    rel, mass = f.rel_err.dropna(), f.err_vs_mass.dropna()
    if len(rel):
        lines.append(
            f"Factorised loss (g_i replaced by its group mean), over {len(f)} groups: relative error median "
            f"{rel.median():.2%}, 90th percentile {rel.quantile(0.9):.2%}, max {rel.max():.2%}; "
            f"relative to the group's loss mass: median {mass.median():.2%}, 90th percentile "
            f"{mass.quantile(0.9):.2%}."
        )
    neg = c.ranges[c.ranges.sign == "-"]
    if len(neg):
        src = "; ".join(sorted(set(neg.b_source)))
        b_txt = f"{neg.b.min():.3g}" if neg.b.min() == neg.b.max() else f"{neg.b.min():.3g}–{neg.b.max():.3g}"
        pos = c.ranges[c.ranges.sign == "+"]
        above = float(np.nanmax(neg.share_above_b)) if neg.share_above_b.notna().any() else 0.0
        lines.append(
            f"Range of g for A<0: [{neg.a.min():.2f}, b] with b = {b_txt} ({src}"
            + (f"; {above:.1%} of those responses have a ratio above b, where g is not bounded by it" if above else "")
            + ")"
            + (f"; for A>0: [0, {pos.b.max():.2f}]." if len(pos) else ".")
        )
    if c.vacuous:
        overall = (
            "The check is VACUOUS for these runs: the bound is ≥ 1 at every observed deviation (each "
            "response's |ḡ_i − ḡ| is below √(ln 2 / 2n) of g's range), so no observation could have "
            "contradicted it. The deviations are small; that is not evidence for the bound."
        )
    elif c.holds and c.tail_exceeds:
        sig = t[t.significant]
        overall = (
            f"The 1−δ coverage HOLDS at every δ, beyond sampling noise, but the tail does not: at "
            f"{len(sig)} (τ, length) points ({', '.join(dict.fromkeys(sig.length_bin))}; τ/(b−a) from "
            f"{sig.t.min():.2f}) more responses deviate than the bound allows, beyond sampling noise, so the "
            "bound fails there for these runs."
        )
    elif c.holds:
        overall = "The bound HOLDS at every δ, beyond sampling noise, and its tail nowhere falls short, for these runs."
    elif c.fails:
        overall = (
            "The bound FAILS, beyond sampling noise, at δ = "
            + ", ".join(f"{d:g}" for d, v in c.verdicts.items() if v == "fails")
            + " for these runs."
        )
    else:
        overall = (
            "NO FIRM VERDICT for these runs: "
            + ", ".join(f"δ={d:g} {v}" for d, v in c.verdicts.items())
            + " ('consistent': met, but too few responses to establish it; 'inconclusive': short of it "
            "within sampling noise)."
        )
    lines.append(
        overall + " Tokens of a response are not independent and the group mean "
        "stands in for E g, so this is a measurement, not an assumption: a failure means the "
        "factorisation's premise does not hold here (token dependence or differences between the "
        "prompts of a group), a pass is evidence for these runs only."
    )
    return " ".join(lines)


def gather(runs: RunSet) -> tuple[pd.DataFrame, list[str]]:
    """All runs' hoeffding rows, each with its run's clip settings; notes on runs without any."""
    frames, notes = [], []
    for r in runs:
        t = r.table("hoeffding")
        if t is None or t.empty:
            notes.append(f"run {r.name} ({r.run_id}) has no off-policy mini-batches (no 'hoeffding' table)")
            continue
        t = t.copy()
        t["run_id"], t["method"], t["arm"] = r.run_id, r.method, r.arm
        t["eps_low"] = r.param("algo.eps_low", 0.2, float)
        t["eps_high"] = r.param("algo.eps_high", 0.28, float)
        t["dual_clip"] = r.param("algo.dual_clip", np.nan, float)
        frames.append(t)
    if not frames:
        raise AnalysisError(
            f"{NAME}: none of the selected runs ({runs.source}) has off-policy mini-batches (table 'hoeffding'); "
            "they appear when a step keeps more prompts than trainer.mini_batch_prompts"
        )
    return pd.concat(frames, ignore_index=True), notes


def plot_hoeffding(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    deltas: Sequence[float] = DELTAS,
    check: HoeffdingCheck | None = None,
) -> FigureResult:
    """Run the check on the selected runs and draw it; save the figure and its tables in `out_dir`.
    (`check`: draw an already computed check instead, e.g. on synthetic data.)"""
    notes: list[str] = []
    if check is None:
        runs = as_runset(runs, uri, experiment, run_ids)
        data, notes = gather(runs)
        check = hoeffding_check(data, deltas=deltas)
    fig = draw_check(check, deltas)
    tables = {
        "hoeffding_coverage": check.coverage,
        "hoeffding_tail": check.tail,
        "hoeffding_factorisation": check.factorisation,
        "hoeffding_ranges": check.ranges,
    }
    caption = (
        "The Hoeffding check of docs/math.md on the off-policy mini-batches. (a) empirical tail of the deviation "
        "of a response's mean clipped factor from its group's mean (solid) against Hoeffding's bound "
        "(dashed), by response length; (b) coverage of the 1−δ band with 95% Clopper–Pearson intervals "
        "(dotted: required 1−δ); (c) each response's deviation against the band's half-width; (d) error of "
        "the factorised loss. " + check.text
    )
    result = FigureResult(
        NAME,
        fig,
        tables,
        caption=caption,
        notes=notes,
        summary={
            "verdicts": check.verdicts,
            "holds": check.holds,
            "fails": check.fails,
            "vacuous": check.vacuous,
            "tail_exceeds": check.tail_exceeds,
            "text": check.text,
        },
    )
    return finish_figure(result, out_dir)


def draw_check(check: HoeffdingCheck, deltas: Sequence[float] = DELTAS):
    import matplotlib

    df, tail, cov, fact = check.responses, check.tail, check.coverage, check.factorisation
    if "length_bin" not in df.columns:  # no response long enough to test
        with style.paper_style():
            fig, axes = style.new_figure(1, 1, height=2.0)
            style.empty_panel(axes[0, 0], f"no response of at least {check.min_tokens} tokens:\nthe check is vacuous")
        return fig
    bins = _ordered(df.length_bin, df.n)
    cmap = matplotlib.colormaps["plasma"]
    bin_colors = {b: cmap(0.85 * i / max(len(bins) - 1, 1)) for i, b in enumerate(bins)}
    delta_colors = dict(zip(deltas, ("#0173B2", "#DE8F05", "#029E73", "#CC78BC", "#949494")))
    with style.paper_style():
        fig, axes = style.new_figure(2, 2, height=4.9)
        ax = axes[0, 0]
        for b in bins:
            d = tail[tail.length_bin == b]
            ax.plot(d.t, d.empirical.where(d.empirical > 0), color=bin_colors[b], label=f"{b} ({d.responses.iloc[0]})")
            ax.plot(d.t, d.bound, color=bin_colors[b], linestyle="--", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_ylim(max(1e-4, 0.5 / max(len(df), 1)), 2.5)
        ax.set(title="(a) P(|ḡᵢ − ḡ| ≥ τ): measured vs bound", xlabel="τ / (b − a)", ylabel="probability (log)")
        from matplotlib.lines import Line2D

        h, _ = ax.get_legend_handles_labels()
        h += [
            Line2D([], [], color="0.3", label="measured"),
            Line2D([], [], color="0.3", linestyle="--", label="Hoeffding bound"),
        ]
        ax.legend(handles=h, loc="lower left", title="length (responses)", fontsize=5.5)

        ax = axes[0, 1]
        groups = ["all"] + bins
        x = np.arange(len(groups))
        width = 0.8 / len(deltas)
        for i, delta in enumerate(deltas):
            c = cov[(cov.delta == delta) & cov.scope.isin(["all", "length"])].set_index("group").reindex(groups)
            xs = x - 0.4 + width * (i + 0.5)
            err = np.vstack([c.coverage - c.cp_low, c.cp_high - c.coverage])
            ax.errorbar(
                xs,
                c.coverage,
                yerr=err,
                fmt="o",
                color=delta_colors[delta],
                markersize=3,
                capsize=1.5,
                linewidth=0.8,
                label=f"δ={delta:g}",
            )
            for xi in xs:
                ax.plot(
                    [xi - width / 2, xi + width / 2],
                    [1 - delta] * 2,
                    color=delta_colors[delta],
                    linestyle=":",
                    linewidth=1.0,
                )
        ax.set_xticks(x, groups, rotation=20)
        lo = float(np.nanmin(cov.coverage)) if len(cov) else 0.8
        ax.set_ylim(min(0.85, lo - 0.05), 1.01)
        ax.set(title="(b) coverage of the 1−δ band", ylabel="share of responses within", xlabel="response length")
        ax.legend(loc="lower left", ncol=len(deltas))

        ax = axes[1, 0]
        rng = np.random.default_rng(0)
        jitter = rng.uniform(-0.25, 0.25, len(df))
        ax.scatter(df.n + jitter, df.t, s=3, alpha=0.35, color="0.25", linewidths=0, rasterized=True, label="responses")
        n_line = np.linspace(max(df.n.min(), 1), df.n.max(), 100)
        for delta in deltas:
            ax.plot(n_line, tau_delta(n_line, delta), color=delta_colors[delta], label=f"τ_δ(n), δ={delta:g}")
        ax.set(
            title="(c) deviation vs Hoeffding half-width",
            xlabel="response length n (tokens)",
            ylabel="|ḡᵢ − ḡ| / (b − a)",
        )
        ax.set_ylim(0, max(float(df.t.max()) * 1.1, float(tau_delta(n_line.max(), min(deltas))) * 1.2, 0.05))
        ax.legend(loc="upper right")

        ax = axes[1, 1]
        exact_share = []
        for col, label, color in (
            ("rel_err", "|exact − fact.| / |exact|", "#0173B2"),
            ("err_vs_mass", "|exact − fact.| / loss mass", "#D55E00"),
        ):
            allv = fact[col].dropna().to_numpy()
            v = np.sort(allv[allv >= EXACT])
            if len(allv):
                exact_share.append(1 - len(v) / len(allv))
            if len(v):
                y = (len(allv) - len(v) + np.arange(1, len(v) + 1)) / len(allv)
                ax.step(np.r_[v[0], v], np.r_[y[0] - 1 / len(allv), y], where="post", color=color, label=label)
        if (fact[["rel_err", "err_vs_mass"]] >= EXACT).any().any():
            style.log_axis(ax, "x")
            ax.legend(loc="center left")
            if exact_share and max(exact_share) > 0:
                lo_s, hi_s = f"{min(exact_share):.0%}", f"{max(exact_share):.0%}"
                share_txt = lo_s if lo_s == hi_s else f"{lo_s}–{hi_s}"
                ax.text(
                    0.98,
                    0.04,
                    f"{share_txt} of groups: error < {EXACT:g}\n(exact up to rounding; start of the curves)",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=5.5,
                    color="0.35",
                )
        else:
            style.empty_panel(ax, f"factorised loss equals the exact one\n(every error < {EXACT:g})")
        ax.set(
            title="(d) error of the factorised loss (per group)",
            xlabel="relative error (log)",
            ylabel="share of groups (ECDF)",
            ylim=(0, 1.02),
        )
    return fig
