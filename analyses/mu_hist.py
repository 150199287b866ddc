"""Figure `mu-hist`: how the step's prompts spread over pass rates during training, one panel per arm.

Table `mu_hist` of every run (a row per step and k = 0..K: the prompts generated that step whose K responses had k
right), summed over the arm's runs, as shares of the step's prompts, stacked from k = 0 (all wrong, bottom) to
k = K (all right, top), 10-step rolling mean. What a loss can weight at all is the interior (0 < k < K): the groups
with mu in {0, 1} carry no gradient. Table `mu_hist.csv`: arm, method, step, k, K, prompts, share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure

NAME = "mu-hist"
COLUMNS = ["arm", "method", "step", "k", "K", "prompts", "share"]
SMOOTH = 10


def mu_hist_table(runs: RunSet) -> tuple[pd.DataFrame, list[str]]:
    rows, notes = [], []
    for arm, members in runs.arms().items():
        parts = []
        for r in members:
            t = r.table("mu_hist")
            if t is None or not len(t):
                notes.append(f"run {r.name} ({r.run_id}) has no mu_hist table")
                continue
            parts.append(t[["step", "k", "K", "prompts"]])
        if not parts:
            continue
        d = pd.concat(parts).groupby(["step", "k", "K"], as_index=False).prompts.sum()
        d["share"] = d.prompts / d.groupby("step").prompts.transform("sum")
        d.insert(0, "method", members[0].method)
        d.insert(0, "arm", arm)
        rows.append(d)
    if not rows:
        raise AnalysisError(f"{NAME}: no run of {runs.source} has a mu_hist table")
    return pd.concat(rows, ignore_index=True)[COLUMNS], notes


def _caption(t: pd.DataFrame) -> str:
    parts = []
    for arm, d in t.groupby("arm", sort=False):
        K = int(d.K.iloc[0])
        steps = sorted(d.step.unique())
        head, tail = steps[: min(10, len(steps))], steps[-min(10, len(steps)) :]

        def interior(window):
            w = d[d.step.isin(window)]
            return w[(w.k > 0) & (w.k < K)].prompts.sum() / w.prompts.sum()

        parts.append(
            f"{arm}: interior share {interior(head):.2f} over the first {len(head)} steps, "
            f"{interior(tail):.2f} over the last {len(tail)}"
        )
    return (
        "Share of each step's prompts at each pass rate k/K (summed over an arm's runs, 10-step rolling mean; "
        "k = 0 at the bottom). Only the interior 0 < k < K carries a gradient. " + "; ".join(parts) + "."
    )


def plot_mu_hist(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the mu-hist figure; save it and its table `mu_hist.csv` in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table, notes = mu_hist_table(runs)
    arms = list(dict.fromkeys(table.arm))
    ncols = min(len(arms), 3)
    nrows = (len(arms) + ncols - 1) // ncols
    Ks = sorted(table.K.unique())
    with style.paper_style():
        fig, axes = style.new_figure(nrows, ncols, height=2.1 * nrows + 0.7)
        flat = [a for row in axes for a in row]
        for ax, arm in zip(flat, arms):
            d = table[table.arm == arm]
            K = int(d.K.iloc[0])
            wide = d.pivot_table(index="step", columns="k", values="share", fill_value=0.0).sort_index()
            wide = wide.reindex(columns=range(K + 1), fill_value=0.0).rolling(SMOOTH, min_periods=1).mean()
            colors = {0: "0.75", K: "0.45", **style.mu_colors(K)}
            ax.stackplot(
                wide.index, *[wide[k] for k in range(K + 1)], colors=[colors[k] for k in range(K + 1)], linewidth=0
            )
            ax.set(
                title=style.wrap(arm, style.title_chars(style.PAGE_WIDTH, ncols)),
                xlabel="training step",
                ylabel="share of prompts" if ax is flat[0] else None,
                ylim=(0, 1),
                xlim=(wide.index.min(), wide.index.max()),
            )
        for ax in flat[len(arms) :]:
            ax.set_visible(False)
        if len(Ks) > 1:  # the interior groups on one colour scale; the grey bands are k = 0 (light) and k = K (dark)
            style.mu_colorbar(fig, flat[: len(arms)], "bands (grey: light k = 0, dark k = K)")
        if len(Ks) == 1:
            from matplotlib.patches import Patch

            K = int(Ks[0])
            colors = {0: "0.75", K: "0.45", **style.mu_colors(K)}
            handles = [Patch(color=colors[k], label=f"{k}/{K}") for k in range(K + 1)]
            fig.legend(handles=handles, loc="outside lower center", ncol=K + 1, title="pass rate k/K")
    return finish_figure(FigureResult(NAME, fig, {"mu_hist": table}, caption=_caption(table), notes=notes), out_dir)
