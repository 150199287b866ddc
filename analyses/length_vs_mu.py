"""Figure `length-vs-mu`: mean length of correct and of incorrect responses against the pass rate,
per method, in successive phases of training.

From each run's `per_mu` table: a group k of a mini-batch holds `prompts` prompts, so
prompts * k correct and prompts * (K - k) incorrect responses, whose mean lengths are `len_correct`
and `len_incorrect`. A phase's mean length is the response-weighted mean over its rows (weights
prompts * k, resp. prompts * (K - k)), pooled over the arm's runs. Phases split the logged steps
into `n_phases` consecutive runs of steps of (nearly) equal count. Table `length_vs_mu.csv`.

Why it matters (docs/math.md): at rho = 1, L_mu = -sum_i A_i |o_i| / sum_i |o_i|, so the gap between the
lengths of wrong and right answers sets the size of each group's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, require_table

NAME = "length-vs-mu"
COLUMNS = [
    "arm",
    "method",
    "phase",
    "step_first",
    "step_last",
    "k",
    "K",
    "mu",
    "len_correct",
    "len_incorrect",
    "gap",
    "n_correct",
    "n_incorrect",
    "n_runs",
]


def phases_of(steps: Sequence[int], n_phases: int) -> list[tuple[int, int]]:
    """Split the sorted unique `steps` into at most `n_phases` consecutive (first, last) ranges."""
    uniq = np.array(sorted(set(int(s) for s in steps)))
    if len(uniq) == 0:
        return []
    chunks = [c for c in np.array_split(uniq, min(n_phases, len(uniq))) if len(c)]
    return [(int(c[0]), int(c[-1])) for c in chunks]


def pool_lengths(per_mu: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean length of right and of wrong answers over the `per_mu` rows of each `by` group, weighted by answers.

    A row holds the means over its group's `prompts` prompts, which gave k right and K - k wrong answers each,
    so it weighs prompts * k (right) and prompts * (K - k) (wrong). Columns: by..., n_correct, n_incorrect,
    len_correct, len_incorrect (NaN where a group has no such answer)."""
    n_c = per_mu.prompts * per_mu.k
    n_i = per_mu.prompts * (per_mu.K - per_mu.k)
    w = per_mu[by].assign(wc=per_mu.len_correct * n_c, wi=per_mu.len_incorrect * n_i, n_correct=n_c, n_incorrect=n_i)
    out = w.groupby(by, sort=False)[["wc", "wi", "n_correct", "n_incorrect"]].sum().reset_index()
    out["len_correct"] = out.wc / out.n_correct.where(out.n_correct > 0)
    out["len_incorrect"] = out.wi / out.n_incorrect.where(out.n_incorrect > 0)
    return out.drop(columns=["wc", "wi"])


def length_table(runs: RunSet, n_phases: int = 3) -> tuple[pd.DataFrame, list[str]]:
    have, notes = require_table(runs, "per_mu", NAME)
    frames = []
    for r in have:
        df = r.table("per_mu")
        df = df[(df.k > 0) & (df.k < df.K)].copy()
        if not {"len_correct", "len_incorrect"} <= set(df.columns):
            notes.append(f"run {r.name} ({r.run_id}) logged no response lengths")
            continue
        df["arm"], df["method"], df["run_id"] = r.arm, r.method, r.run_id
        frames.append(df)
    if not frames:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged per-mu response lengths")
    df = pd.concat(frames, ignore_index=True)
    phases = phases_of(df.step, n_phases)
    df["phase"] = 0
    for i, (a, b) in enumerate(phases):
        df.loc[(df.step >= a) & (df.step <= b), "phase"] = i + 1
    keys = ["arm", "method", "phase", "k", "K"]
    out = pool_lengths(df, keys)
    out = out.merge(df.groupby(keys, sort=False).run_id.nunique().rename("n_runs").reset_index(), on=keys)
    out["gap"] = out.len_incorrect - out.len_correct
    out["mu"] = out.k / out.K
    out["step_first"] = out.phase.map({i + 1: a for i, (a, _) in enumerate(phases)})
    out["step_last"] = out.phase.map({i + 1: b for i, (_, b) in enumerate(phases)})
    order = {a: i for i, a in enumerate(runs.arms())}
    out = out.sort_values(["arm", "phase", "k"], key=lambda s: s.map(order) if s.name == "arm" else s)
    return out[COLUMNS].reset_index(drop=True), notes


def _caption(t: pd.DataFrame) -> str:
    parts = []
    for arm, d in t.groupby("arm", sort=False):
        last = d[d.phase == d.phase.max()].dropna(subset=["gap"])
        if last.empty:
            continue
        longer = int((last.gap > 0).sum())
        parts.append(
            f"{arm}: incorrect answers are longer at {longer} of {len(last)} pass rates in the last phase "
            f"(mean gap {last.gap.mean():+.2f} tokens)"
        )
    return (
        "Mean response length of correct (solid) and incorrect (dashed) answers against the pass rate μ, "
        "one panel per phase of training (response-weighted means over the phase's mini-batches and seeds). "
        + "; ".join(parts)
        + "."
    )


def plot_length_vs_mu(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    n_phases: int = 3,
) -> FigureResult:
    """Draw the length-vs-mu figure; save it and its table `length_vs_mu.csv` in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table, notes = length_table(runs, n_phases)
    phases = sorted(table.phase.unique())
    arms = list(dict.fromkeys(table.arm))
    with style.paper_style():
        fig, axes = style.new_figure(1, len(phases), height=2.5, sharey=True)
        for ax, ph in zip(axes[0], phases):
            d = table[table.phase == ph]
            for arm in arms:
                a = d[d.arm == arm].sort_values("mu")
                st = runs.arm_style(arm)
                ax.plot(a.mu, a.len_correct, color=st["color"], marker=st["marker"], linestyle="-")
                ax.plot(
                    a.mu,
                    a.len_incorrect,
                    color=st["color"],
                    marker=st["marker"],
                    linestyle="--",
                    markerfacecolor="white",
                )
            a0, b0 = int(d.step_first.iloc[0]), int(d.step_last.iloc[0])
            ax.set(title=f"steps {a0}–{b0}" if a0 != b0 else f"step {a0}", xlabel="pass rate μ", xlim=(0, 1))
        axes[0, 0].set_ylabel("mean response length (tokens)")
        from matplotlib.lines import Line2D

        handles = style.arm_handles(runs, arms) + [
            Line2D([], [], color="0.3", linestyle="-", label="correct"),
            Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white", label="incorrect"),
        ]
        style.top_legend(fig, handles, style.legend_columns([h.get_label() for h in handles], 8))
    result = FigureResult(NAME, fig, {"length_vs_mu": table}, caption=_caption(table), notes=notes)
    return finish_figure(result, out_dir)
