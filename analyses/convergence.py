"""Figure `convergence`: held-out accuracy and training reward against step for every arm (mean
over seeds with a 95% t-interval band when there are several), and the steps each arm needs to
reach a given accuracy.

Metrics: `eval/greedy_acc` (held-out, greedy; step 0 is the starting policy), `eval/sampled_acc`
(held-out, the mean reward of `trainer.eval_samples` responses per prompt at the rollout temperature:
what training optimises) and `reward/mean` (mean verifier reward of the step's rollouts). At each step
the mean and CI are over the arm's runs that logged that step (`n_runs`). Steps to target, on the
sampled accuracy when every run logged it (greedy otherwise; `accuracy` chooses, and 'MODE:level_N', an ablation's
one-level endpoint, puts that level's accuracy in panel (b) and under steps to target): the first step at
which the arm's mean curve reaches `target`; per run, the first step at which that run does. The
default target is the ablation summary's: 80% of the way from the mean starting accuracy to the best arm's mean final
accuracy (`daro_lab.ablation.summary.progress_target`), so a report's table and figure use one target.
Tables: `convergence.csv` (arm, method, metric, step, mean, ci, n_runs), `convergence_steps.csv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, mean_ci
from daro_lab.record import EVAL_GREEDY, EVAL_SAMPLED, REWARD_MEAN

NAME = "convergence"
ACC, SAMPLED, REWARD = EVAL_GREEDY, EVAL_SAMPLED, REWARD_MEAN
FIG_HEIGHT_IN = 4.6
PANEL_HEIGHT_IN = 1.5  # a panel's axes, about, under the legend: what the bar labels of (d) share


def curves(runs: RunSet, metrics: Sequence[str] = (ACC, SAMPLED, REWARD)) -> pd.DataFrame:
    """Mean and CI over each arm's runs of each metric by step."""
    rows = []
    for arm, members in runs.arms().items():
        for key in metrics:
            per_run = [r.series(key) for r in members]
            per_run = [s for s in per_run if len(s)]
            if not per_run:
                continue
            wide = pd.concat(per_run, axis=1)
            for step, vals in wide.iterrows():
                m, ci, n = mean_ci(vals.to_numpy())
                if n:
                    rows.append(
                        {
                            "arm": arm,
                            "method": members[0].method,
                            "metric": key,
                            "step": int(step),
                            "mean": m,
                            "ci": ci,
                            "n_runs": n,
                        }
                    )
    return pd.DataFrame(rows, columns=["arm", "method", "metric", "step", "mean", "ci", "n_runs"])


def default_target(acc: pd.DataFrame) -> float:
    """The ablation summary's definition (`daro_lab.ablation.summary.progress_target`): TARGET_FRACTION of the way from
    the mean starting accuracy (the first logged step) to the best arm's mean accuracy at its last step (its final
    accuracy, not the best of a noisy curve); if no arm improves on the start, that accuracy itself."""
    from daro_lab.ablation.summary import progress_target

    first = acc.step.min()
    start = acc[acc.step == first]["mean"].mean()
    finals = acc.sort_values("step").groupby("arm")["mean"].last()
    return progress_target(float(start), float(finals.max()) if len(finals) else float(start))


def steps_to_target(runs: RunSet, acc: pd.DataFrame, target: float, key: str = ACC) -> pd.DataFrame:
    rows = []
    for arm, members in runs.arms().items():
        a = acc[acc.arm == arm].sort_values("step")
        if a.empty:
            continue
        hit = a[(a["mean"] >= target - 1e-12) & (a.step >= 1)]
        per_run = []
        for r in members:
            s = r.series(key).sort_index()
            h = s[(s >= target - 1e-12) & (s.index >= 1)]
            per_run.append(int(h.index[0]) if len(h) else None)
        reached = [s for s in per_run if s is not None]
        rows.append(
            {
                "arm": arm,
                "method": members[0].method,
                "target": target,
                "step_mean_curve": int(hit.step.iloc[0]) if len(hit) else None,
                "n_reached": len(reached),
                "n_runs": len(per_run),
                "steps_per_run": ";".join("-" if s is None else str(s) for s in per_run),
                "last_step": int(a.step.max()),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["arm", "method", "target", "step_mean_curve", "n_reached", "n_runs", "steps_per_run", "last_step"],
    )


def _words(accuracy: str) -> str:
    """'sampled' -> 'sampled'; 'sampled:level_5' -> 'sampled level-5'."""
    mode, _, level = accuracy.partition(":")
    return f"{mode} {level.replace('_', '-')}" if level else mode


def _caption(c: pd.DataFrame, steps: pd.DataFrame, target: float, key: str, accuracy: str) -> str:
    parts = []
    acc = c[c.metric == key]
    what = _words(accuracy)
    for arm, a in acc.groupby("arm", sort=False):
        a = a.sort_values("step")
        last = a.iloc[-1]
        s = steps[steps.arm == arm].iloc[0]
        reach = (
            f"first reaches {target:.3f} at step {int(s.step_mean_curve)}"
            if pd.notna(s.step_mean_curve)
            else f"does not reach {target:.3f} within {int(s.last_step)} steps"
        )
        txt = (
            f"{arm}'s {what} accuracy goes from {a['mean'].iloc[0]:.3f} to {last['mean']:.3f} at step "
            f"{int(last.step)} (best {a['mean'].max():.3f}) and {reach}"
        )
        if key != ACC:
            g = c[(c.metric == ACC) & (c.arm == arm)].sort_values("step")
            if len(g):
                txt += f"; greedy {g['mean'].iloc[0]:.3f} → {g['mean'].iloc[-1]:.3f}"
        parts.append(txt)
    n = int(c.n_runs.max()) if len(c) else 0
    band = (
        "bands: 95% t-interval over seeds, clipped to [0, 1]" + (" — wide with 2 seeds (t = 12.7)" if n == 2 else "")
        if n > 1
        else "one seed per arm, so no confidence band"
    )
    first = acc.step.min()
    improved = (acc[acc.step > first]["mean"] > acc[acc.step == first]["mean"].mean()).any()
    if not improved:
        band += "; no arm improved on its starting accuracy, so the target is the best accuracy reached after the start"
    sampled = c[c.metric == SAMPLED]
    mode, _, level = accuracy.partition(":")
    panels = (
        f"held-out greedy accuracy (a), held-out {mode} accuracy on the {level.replace('_', '-')} prompts only (b: "
        "the ablation's endpoint), training reward (c)"
        if level
        else "held-out greedy accuracy (a), held-out sampled accuracy (b: avg@n at the rollout temperature, what "
        "training optimises), training reward (c)"
        if len(sampled)
        else "held-out greedy accuracy (a), training reward (c)"
    )
    return (
        f"{panels} against step, mean over seeds ({band}); (d): training steps (≥ 1) until the mean {what} "
        f"accuracy curve first reaches {target:.3f}. " + "; ".join(parts) + "."
    )


def plot_convergence(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    target: float | None = None,
    accuracy: str | None = None,
) -> FigureResult:
    """Draw the convergence figure; save it and its tables in `out_dir`. accuracy: the accuracy of steps-to-target,
    'greedy' or 'sampled' (default: sampled when every run logged it, else greedy) or 'MODE:level_N' (one level's,
    drawn in panel (b))."""
    from daro_lab.ablation.summary import acc_key

    runs = as_runset(runs, uri, experiment, run_ids)
    if accuracy is None:
        accuracy = "sampled" if all(r.has_metric(SAMPLED) for r in runs) else "greedy"
    try:
        key = acc_key(accuracy)
    except ValueError as e:
        raise AnalysisError(f"{NAME}: accuracy: {e}") from None
    c = curves(runs, (ACC, SAMPLED, REWARD) + ((key,) if key not in (ACC, SAMPLED) else ()))
    if c[c.metric == ACC].empty:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged held-out accuracy ({ACC})")
    notes = [f"run {r.name} ({r.run_id}) logged no {ACC}" for r in runs if not r.has_metric(ACC)]
    acc = c[c.metric == key]
    if acc.empty:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged {key}")
    if target is None:
        target = default_target(acc)
    steps = steps_to_target(runs, acc, target, key)
    arms = list(dict.fromkeys(c.arm))
    with style.paper_style():
        fig, axes = style.new_figure(2, 2, height=FIG_HEIGHT_IN)
        mode, _, level = accuracy.partition(":")
        for ax, metric, title in (
            (axes[0, 0], ACC, "(a) held-out accuracy (greedy)"),
            (axes[0, 1], key, f"(b) held-out accuracy, {level.replace('_', ' ')} ({mode})")
            if level
            else (axes[0, 1], SAMPLED, "(b) held-out accuracy (sampled, avg@n)"),
            (axes[1, 0], REWARD, "(c) training reward"),
        ):
            d = c[c.metric == metric]
            for arm in arms:
                style.arm_curve(ax, runs, arm, d[d.arm == arm], marker=metric != REWARD, lower=0.0, upper=1.0)
            ax.set(title=title, xlabel="training step", ylabel="mean reward" if metric == REWARD else "accuracy")
            if d.empty:
                style.empty_panel(ax, f"no {metric} logged")
        target_ax = axes[0, 0] if key == ACC else axes[0, 1]
        target_ax.axhline(target, color="0.4", linestyle=":", linewidth=0.9)
        target_ax.annotate(
            f"target {target:.3f}",
            (0.02, target),
            xycoords=("axes fraction", "data"),
            fontsize=6,
            color="0.35",
            va="bottom",
        )
        ax = axes[1, 1]
        y = np.arange(len(steps))
        vals = [v if pd.notna(v) else np.nan for v in steps.step_mean_curve]
        colors = [runs.arm_style(a)["color"] for a in steps.arm]
        ax.barh(y, [0 if math.isnan(v) else v for v in vals], color=colors, height=0.6)
        for yi, v, last in zip(y, vals, steps.last_step):
            ax.text(
                0 if math.isnan(v) else v,
                yi,
                f" not reached (≤{last})" if math.isnan(v) else f" {int(v)}",
                va="center",
                fontsize=6,
            )
        ax.set_yticks(y, style.wrap_rows(steps.arm, 26, PANEL_HEIGHT_IN), fontsize=6)
        ax.invert_yaxis()
        ax.set(title=f"(d) steps to {_words(accuracy)} accuracy {target:.3f}", xlabel="training step")
        xmax = max([v for v in vals if not math.isnan(v)] + list(steps.last_step) + [1])
        ax.set_xlim(0, xmax * 1.35)
        ax.grid(axis="y", visible=False)
        style.arm_legend(fig, runs, arms)
    result = FigureResult(
        NAME,
        fig,
        {"convergence": c, "convergence_steps": steps},
        caption=_caption(c, steps, target, key, accuracy),
        notes=notes,
        summary={"target": target, "accuracy": accuracy},
    )
    return finish_figure(result, out_dir)
