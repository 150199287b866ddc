"""Figure `grad-norms`: the total policy-gradient norm and the per-group norms G_mu over training.

Total: metric `grad/norm`, the global norm of the step's gradient before clipping (mean over the
step's mini-batches). Per group: G_mu = ||grad_theta C_mu||, column `gradnorm` of the `per_mu` table,
measured on the first mini-batch of every `trainer.grad_norm_every`-th step (and step 1). Both
are averaged over the arm's runs (seeds). Table `grad_norms.csv`: arm, method, quantity ('total'
or 'G'), step, k, K, mu (empty for the total), mean, ci, n_runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, mean_ci
from daro_lab.record import GRAD_NORM

NAME = "grad-norms"
TOTAL = GRAD_NORM
COLUMNS = ["arm", "method", "quantity", "step", "k", "K", "mu", "mean", "ci", "n_runs"]


def grad_table(runs: RunSet) -> tuple[pd.DataFrame, list[str]]:
    notes, rows = [], []
    for arm, members in runs.arms().items():
        method = members[0].method
        tot = [r.series(TOTAL) for r in members if r.has_metric(TOTAL)]
        if tot:
            wide = pd.concat(tot, axis=1)
            for step, vals in wide.iterrows():
                m, ci, n = mean_ci(vals.to_numpy())
                rows.append(
                    {
                        "arm": arm,
                        "method": method,
                        "quantity": "total",
                        "step": int(step),
                        "k": np.nan,
                        "K": np.nan,
                        "mu": np.nan,
                        "mean": m,
                        "ci": ci,
                        "n_runs": n,
                    }
                )
        per_run = []
        for r in members:
            pm = r.per_mu_with("gradnorm")
            if pm is None:
                notes.append(f"run {r.name} ({r.run_id}) has no per-group gradient norms G_mu")
                continue
            g = pm.groupby(["step", "k", "K"]).gradnorm.mean().rename(r.run_id)
            per_run.append(g)
        if per_run:
            wide = pd.concat(per_run, axis=1)
            for (step, k, K), vals in wide.iterrows():
                m, ci, n = mean_ci(vals.to_numpy())
                rows.append(
                    {
                        "arm": arm,
                        "method": method,
                        "quantity": "G",
                        "step": int(step),
                        "k": int(k),
                        "K": int(K),
                        "mu": k / K,
                        "mean": m,
                        "ci": ci,
                        "n_runs": n,
                    }
                )
    if not rows:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged gradient norms ({TOTAL} or per_mu gradnorm)")
    return pd.DataFrame(rows, columns=COLUMNS), notes


def _caption(t: pd.DataFrame) -> str:
    parts = []
    for arm, d in t.groupby("arm", sort=False):
        tot = d[d.quantity == "total"]
        txt = f"{arm}: total norm {tot['mean'].median():.3g} (median over steps)" if len(tot) else f"{arm}:"
        g = d[d.quantity == "G"]
        if len(g):
            by_k = g.groupby(["k", "K"])["mean"].mean()
            (kmax, K), (kmin, _) = by_k.idxmax(), by_k.idxmin()
            txt += (
                f", largest mean G at μ={int(kmax)}/{int(K)} ({by_k.max():.3g}), smallest at "
                f"μ={int(kmin)}/{int(K)} ({by_k.min():.3g})"
            )
        parts.append(txt)
    return (
        "Gradient norms over training: the total norm of the policy gradient before clipping (left, mean "
        "over seeds) and G_μ = ‖∇_θ C_μ‖, the norm of each pass-rate group's contribution (one panel per "
        "method, log scale). " + "; ".join(parts) + "."
    )


def plot_grad_norms(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the grad-norms figure; save it and its table `grad_norms.csv` in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table, notes = grad_table(runs)
    arms = list(dict.fromkeys(table.arm))
    g_arms = [a for a in arms if ((table.arm == a) & (table.quantity == "G")).any()]
    n = 1 + len(g_arms)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    with style.paper_style():
        fig, axes = style.new_figure(nrows, ncols, height=2.3 * nrows + 0.5)
        flat = [a for row in axes for a in row]
        ax = flat[0]
        tot = table[table.quantity == "total"]
        for arm in arms:
            d = tot[tot.arm == arm].sort_values("step")
            if d.empty:
                continue
            st = runs.arm_style(arm)
            ax.plot(d.step, d["mean"], color=st["color"], linestyle=st["linestyle"])
            if d.ci.notna().any():
                style.band(ax, d.step, d["mean"], d.ci, st["color"], lower=float(d["mean"].min()) / 10)
        ax.set(title="(a) total gradient norm", xlabel="training step", ylabel="‖∇θ loss‖, before clipping (log)")
        if len(tot):
            style.log_axis(ax)
        if tot.empty:
            style.empty_panel(ax, f"no {TOTAL} logged")
        letters = "bcdefghijk"
        Ks = sorted(table.K.dropna().unique())
        for i, arm in enumerate(g_arms):
            ax = flat[i + 1]
            d = table[(table.arm == arm) & (table.quantity == "G")]
            K = int(d.K.iloc[0])
            colors = style.mu_colors(K)
            for k, dk in d.groupby("k"):
                dk = dk.sort_values("step")
                dk = dk[dk["mean"] > 0]
                ax.plot(
                    dk.step,
                    dk["mean"],
                    color=colors[int(k)],
                    marker="o",
                    markersize=2.5,
                    label=style.mu_label(int(k), K),
                )
            style.log_axis(ax)
            title = f"({letters[i]}) {arm}: G$_\\mu$ = ‖∇θ C$_\\mu$‖"
            ax.set(
                title=style.wrap(title, style.title_chars(style.PAGE_WIDTH, ncols)),
                xlabel="training step",
                ylabel="G$_\\mu$ (log)",
            )
        for ax in flat[n:]:
            ax.set_visible(False)
        style.arm_legend(fig, runs, arms)
        if len(Ks) > 1:  # one colour scale, not a legend over each panel's curves
            style.mu_colorbar(fig, flat[1:n], "G_μ panels")
        elif len(Ks) == 1:
            fig.legend(
                handles=style.mu_handles(int(Ks[0])),
                loc="outside lower center",
                ncol=int(Ks[0]) - 1,
                title="pass-rate group",
            )
        if not g_arms:
            notes.append("no per-group gradient norms G_mu in any run (trainer.grad_norm_every = 0)")
    result = FigureResult(NAME, fig, {"grad_norms": table}, caption=_caption(table), notes=notes)
    return finish_figure(result, out_dir)
