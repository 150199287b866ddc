"""Figure `weights`: DARO's weight trajectories w_mu over steps (one line per mu), and the balance the
method aims for: w_mu * signal_mu / C, which its w-gradient drives to 1 for every group (the fixed point
w = C / signal of the reading the run used; runs from before readings were recorded: w_mu * |L_mu|, the
paper's reading with C = 1).

w_mu: metric `daro/weight/mu_{k}of{K}`, the weights after each step (logged every step, for every
k, present or not). Balance: column `daro/wS` (or `daro/wL`) of the `per_mu` table, averaged over the step's
mini-batches where the group is present. Both are averaged over the arm's runs (seeds). Arms whose runs
have no weights (GRPO, DAPO, ...) are left out; `static` arms (frozen weights) are drawn, flat.
Table `weights.csv`: arm, method, step, k, K, mu, w, w_ci, wL, wL_abs, wS, balance, n_runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, mean_ci

NAME = "weights"
PREFIX = "daro/weight/mu_"
MAX_COLUMNS = 4  # arms per row of panels
SMOOTH = 10  # the balance panel: rolling median over this many steps


def smoothed_balance(dk: pd.DataFrame) -> pd.Series:
    """One group's balance by step as a rolling median over SMOOTH steps: a step where the group's signal is near 0
    (|L_mu| ~ 1e-6) gives w·signal/C ~ 1e-6, a spike that a log axis would draw over the whole panel."""
    wl = dk.dropna(subset=["balance"])
    wl = wl[wl.balance > 0].set_index("step").balance.sort_index()
    return wl.rolling(SMOOTH, min_periods=1).median()


def _k_of(key: str) -> tuple[int, int]:
    k, K = key[len(PREFIX) :].split("of")
    return int(k), int(K)


def weights_table(runs: RunSet) -> tuple[pd.DataFrame, list[str]]:
    notes = []
    frames = []
    for arm, members in runs.arms().items():
        for r in members:
            keys = r.keys_with_prefix(PREFIX)
            if not keys:
                continue
            m = r.metrics_frame(keys)
            kk = m.key.map(_k_of)
            m["k"], m["K"] = [k for k, _ in kk], [K for _, K in kk]
            m = m.rename(columns={"value": "w"})[["step", "k", "K", "w"]]
            pm = r.table("per_mu")
            if pm is not None and "daro/wL" in pm.columns:
                wl = pm.dropna(subset=["daro/wL"]).rename(columns={"daro/wL": "wL", "daro/wS": "wS"})
                wl = wl.assign(wL_abs=wl.wL.abs())
                if "wS" not in wl.columns:
                    wl["wS"] = np.nan
                wl = wl.groupby(["step", "k"])[["wL", "wL_abs", "wS"]].mean().reset_index()
                m = m.merge(wl, on=["step", "k"], how="left")
            else:
                m["wL"] = m["wL_abs"] = m["wS"] = np.nan
                notes.append(f"run {r.name} ({r.run_id}) has no per_mu table: no balance w_mu * signal_mu / C")
            m["arm"], m["method"], m["run_id"] = arm, r.method, r.run_id
            frames.append(m)
    if not frames:
        raise AnalysisError(
            f"{NAME}: none of the selected runs ({runs.source}) has DARO weights (metrics daro/weight/*); "
            f"methods selected: {', '.join(runs.methods())}. Train with --algo daro (or static)."
        )
    df = pd.concat(frames, ignore_index=True)
    g = df.groupby(["arm", "method", "step", "k", "K"], sort=False)
    out = g[["w", "wL", "wL_abs", "wS"]].mean()
    out["w_ci"] = g.w.agg(lambda s: mean_ci(s)[1])
    out["n_runs"] = g.run_id.nunique()
    out = out.reset_index()
    out["mu"] = out.k / out.K
    # the balance of the reading the run used; older runs recorded only w L (the paper's reading, C = 1)
    out["balance"] = out.wS.where(out.groupby("arm").wS.transform(lambda x: x.notna().any()), out.wL_abs)
    return out[["arm", "method", "step", "k", "K", "mu", "w", "w_ci", "wL", "wL_abs", "wS", "balance", "n_runs"]], notes


def _caption(t: pd.DataFrame) -> str:
    parts = []
    for arm, d in t.groupby("arm", sort=False):
        last = d[d.step == d.step.max()]
        lo, hi = last.loc[last.w.idxmin()], last.loc[last.w.idxmax()]
        txt = (
            f"{arm} at step {int(last.step.iloc[0])}: w ranges from {lo.w:.3g} (μ={int(lo.k)}/{int(lo.K)}) "
            f"to {hi.w:.3g} (μ={int(hi.k)}/{int(hi.K)})"
        )
        wl = d.dropna(subset=["balance"])
        if len(wl):
            wl_last = wl[wl.step == wl.step.max()]
            what = "w·signal/C" if d.wS.notna().any() else "w·|L|"
            txt += (
                f"; {what} at step {int(wl_last.step.iloc[0])} spans {wl_last.balance.min():.3g}–"
                f"{wl_last.balance.max():.3g} (fixed point: 1)"
            )
        parts.append(txt)
    return (
        "DARO weights w_μ after each step (top; log scale when they spread over more than a factor 3) and "
        f"the balance (bottom, log scale, {SMOOTH}-step rolling median, the axis spanning the bulk of it): "
        "w_μ·signal_μ/C, which the weights' gradient drives to 1 for "
        "every group (runs without it: w_μ·|L_μ|, the paper's reading), mean over seeds (95% intervals in the "
        "table). " + "; ".join(parts) + "."
    )


def plot_weights(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the weights figure; save it and its table `weights.csv` in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table, notes = weights_table(runs)
    arms = list(dict.fromkeys(table.arm))
    n = len(arms)
    ncols = min(n, MAX_COLUMNS)  # more arms wrap into more rows: titles and the last column keep their room
    arm_rows = (n + ncols - 1) // ncols
    width = min(style.PAGE_WIDTH, max(style.COLUMN_WIDTH, 2.6 * ncols))
    with style.paper_style():
        fig, axes = style.new_figure(2 * arm_rows, ncols, width=width, height=2.3 * 2 * arm_rows + 0.5)
        chars = style.title_chars(width, ncols)  # long arm labels wrap inside their column
        Ks = sorted(table.K.unique())
        for j, arm in enumerate(arms):
            d = table[table.arm == arm]
            K = int(d.K.iloc[0])
            colors = style.mu_colors(K)
            row, col = 2 * (j // ncols), j % ncols
            ax_w, ax_l = axes[row, col], axes[row + 1, col]
            shown = []
            for k, dk in d.groupby("k"):
                dk = dk.sort_values("step")
                ax_w.plot(dk.step, dk.w, color=colors[int(k)], label=style.mu_label(int(k), K))
                wl = smoothed_balance(dk)
                ax_l.plot(wl.index, wl.to_numpy(), color=colors[int(k)], linewidth=1.0)
                shown.append(wl)
            log_w = d.w.max() / max(d.w.min(), 1e-300) > 3
            if log_w:
                style.log_axis(ax_w)
            ax_w.set(
                title=style.wrap(arm, chars) + "\nweights w$_\\mu$",
                ylabel=("w$_\\mu$ (log)" if log_w else "w$_\\mu$") if col == 0 else None,
            )
            ax_l.axhline(1.0, color="0.4", linestyle=":", linewidth=0.9)
            style.log_axis(ax_l)
            vals = pd.concat(shown).to_numpy() if shown else np.array([])
            vals = vals[np.isfinite(vals) & (vals > 0)]
            if len(vals):  # the bulk of the smoothed balance, and 1, in view
                lo, hi = np.quantile(vals, [0.01, 0.99])
                ax_l.set_ylim(min(lo, 1.0) / 1.5, max(hi, 1.0) * 1.5)
            what = "w$_\\mu$·signal$_\\mu$/C" if d.wS.notna().any() else "w$_\\mu$·|L$_\\mu$|"
            ax_l.set(
                title=f"balance\n({SMOOTH}-step median)",  # two lines: fits the narrowest column
                xlabel="training step",
                ylabel=f"{what} (log)" if col == 0 else None,
            )
        for j in range(n, arm_rows * ncols):
            row, col = 2 * (j // ncols), j % ncols
            axes[row, col].set_visible(False)
            axes[row + 1, col].set_visible(False)
        if len(Ks) > 1:
            style.mu_colorbar(fig, [ax for ax in axes.flat if ax.get_visible()], "curves")
        else:
            from matplotlib.lines import Line2D

            handles = style.mu_handles(int(Ks[0])) + [
                Line2D([], [], color="0.4", linestyle=":", label="fixed point (1)")
            ]
            ncol = min(len(handles), 8 if n > 1 else 4)
            fig.legend(handles=handles, loc="outside lower center", ncol=ncol)
    result = FigureResult(NAME, fig, {"weights": table}, caption=_caption(table), notes=notes)
    return finish_figure(result, out_dir)
