"""Figure `levels`: held-out sampled accuracy by difficulty level over training, one panel per level, one line per
arm (mean over its runs, 95% t-band where it has several).

Metric `eval/sampled_acc/level_N` (avg@n at the rollout temperature over the held-out prompts of level N; the
chain task's level is its number of operands), or `eval/greedy_acc/level_N` where a run logged no sampled
accuracy. Where per-pass-rate weighting matters, it should show by level first: a reweighting that favours hard
prompts should move the hardest level's curve. Table `levels.csv`: arm, method, metric, level, step, mean, ci,
n_runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, mean_ci

NAME = "levels"
_LEVEL = re.compile(r"eval/(sampled|greedy)_acc/level_(\d+)$")
COLUMNS = ["arm", "method", "metric", "level", "step", "mean", "ci", "n_runs"]


def level_table(runs: RunSet) -> pd.DataFrame:
    """Per arm, level and step: the mean over the arm's runs of the level's accuracy (sampled where logged)."""
    rows = []
    for arm, members in runs.arms().items():
        keys = sorted({k for r in members for k in r.metric_keys if _LEVEL.match(k)})
        mode = "sampled" if any(_LEVEL.match(k).group(1) == "sampled" for k in keys) else "greedy"
        for key in (k for k in keys if _LEVEL.match(k).group(1) == mode):
            level = int(_LEVEL.match(key).group(2))
            series = [r.series(key) for r in members if r.has_metric(key)]
            wide = pd.concat(series, axis=1)
            for step, vals in wide.iterrows():
                m, ci, n = mean_ci(vals.to_numpy())
                rows.append(
                    {
                        "arm": arm,
                        "method": members[0].method,
                        "metric": f"{mode}_acc",
                        "level": level,
                        "step": int(step),
                        "mean": m,
                        "ci": ci,
                        "n_runs": n,
                    }
                )
    if not rows:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged accuracy by level (eval/sampled_acc/level_N)")
    return pd.DataFrame(rows, columns=COLUMNS)


def _caption(t: pd.DataFrame) -> str:
    parts = []
    for level, d in t.groupby("level"):
        last = d.sort_values("step").groupby("arm").last()
        first = d.sort_values("step").groupby("arm").first()
        txt = ", ".join(f"{arm} {first.loc[arm, 'mean']:.3f} → {last.loc[arm, 'mean']:.3f}" for arm in last.index)
        parts.append(f"level {level}: {txt}")
    metric = t.metric.iloc[0].replace("_", " ")
    return (
        f"Held-out {metric} by difficulty level over training (mean over each arm's runs; bands: 95% t-interval "
        "over runs where an arm has several). First → last evaluation: " + "; ".join(parts) + "."
    )


def plot_levels(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the levels figure; save it and its table `levels.csv` in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table = level_table(runs)
    levels = sorted(table.level.unique())
    arms = list(dict.fromkeys(table.arm))
    ncols = min(len(levels), 4)
    nrows = (len(levels) + ncols - 1) // ncols
    with style.paper_style():
        fig, axes = style.new_figure(nrows, ncols, height=2.1 * nrows + 0.6)
        flat = [a for row in axes for a in row]
        for ax, level in zip(flat, levels):
            d = table[table.level == level]
            for arm in arms:
                style.arm_curve(ax, runs, arm, d[d.arm == arm], lower=0.0, upper=1.0)
            ax.set(
                title=f"level {level}",
                xlabel="training step",
                ylabel=table.metric.iloc[0].replace("_", " ") if ax is flat[0] else None,
            )
        for ax in flat[len(levels) :]:
            ax.set_visible(False)
        style.arm_legend(fig, runs, arms)
    return finish_figure(FigureResult(NAME, fig, {"levels": table}, caption=_caption(table)), out_dir)
