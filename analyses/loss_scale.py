"""Figure `loss-scale`: how much of the loss, and of the gradient, each pass-rate group gets.

Read from each run's `per_mu` table (one row per step, mini-batch and group k):

- S_mu per prompt (S / prompts), averaged over the window, then normalised to sum 1 over mu: the
  loss scale a *single prompt* at mu gets. Drawn against the static shapes of DESIGN.md
  (`daro_lab.algorithms.losses.static_shape`), normalised over the same mu grid.
- |C_mu| and G_mu as shares of the total: in every (step, mini-batch) the group's |C| (or G) over
  the sum over groups, a group absent from the mini-batch counting 0, averaged over the window's
  mini-batches (G: over the mini-batches where G was measured). These are what each group
  *receives*, prompt counts included; equal shares are what DARO aims for.
- DARO's w_mu * L_mu (mean over the window's rows where the group is present).
- a panel per arm over steps: each group's share of |C| per step (mean over the step's mini-batches).

Every quantity is computed per run, then averaged over the arm's runs (seeds); the per-prompt
share is normalised after that average. The tables are `loss_scale.csv` (per arm and mu),
`loss_scale_steps.csv` (per arm, step and mu) and `loss_scale_reference.csv` (the static shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, require_table

NAME = "loss-scale"
STATIC_METHODS = ("grpo", "dapo", "dr_grpo", "lipo")


def per_mu_frame(run, window: tuple[int, int] | None = None) -> pd.DataFrame:
    """The run's per_mu rows within the step window (inclusive), with interior k only."""
    df = run.table("per_mu")
    if df is None:
        return pd.DataFrame()
    df = df[(df.k > 0) & (df.k < df.K)].copy()
    if window is not None:
        df = df[(df.step >= window[0]) & (df.step <= window[1])]
    return df


def _shares(df: pd.DataFrame, col: str, absolute: bool = False) -> pd.DataFrame:
    """Per (step, minibatch): each group's share of the column's total over groups (absent groups:
    no row). Rows where the total is 0 or the column is missing are dropped."""
    d = df[["step", "minibatch", "k", col]].dropna(subset=[col]).copy()
    if absolute:
        d[col] = d[col].abs()
    tot = d.groupby(["step", "minibatch"])[col].transform("sum")
    d = d[tot > 0]
    d["share"] = d[col] / tot[tot > 0]
    return d


def run_summary(run, window: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per group k of one run: window means of the shares and per-prompt scale."""
    df = per_mu_frame(run, window)
    if df.empty:
        return pd.DataFrame()
    K = int(df.K.iloc[0])
    ks = sorted(df.k.unique())
    out = pd.DataFrame({"k": ks})
    out["K"] = K
    out["mu"] = out.k / K
    n_mb = df.groupby(["step", "minibatch"]).ngroups
    for col, name, absolute in (("S", "S_share", False), ("C", "C_abs_share", True), ("G", "G_share", False)):
        if col not in df.columns:
            out[name] = np.nan
            continue
        sh = _shares(df, col, absolute)
        n = sh.groupby(["step", "minibatch"]).ngroups if col == "G" else n_mb
        if n == 0:
            out[name] = np.nan
            continue
        out[name] = out.k.map(sh.groupby("k").share.sum() / n).fillna(0.0)
    present = df.groupby("k")
    out["S_per_prompt"] = out.k.map((df.S / df.prompts).groupby(df.k).mean())
    out["prompts"] = out.k.map(present.prompts.mean())
    for col in ("w", "wL", "L"):
        out[col] = out.k.map(present[col].mean()) if col in df.columns else np.nan
    out["wL_abs"] = out.k.map(df.wL.abs().groupby(df.k).mean()) if "wL" in df.columns else np.nan
    out["rows"] = out.k.map(present.size())
    return out


def reference_shares(method: str, K: int, n_prompts: int, ks: Sequence[int]) -> np.ndarray:
    """static_shape(method, k/K, N) for k in `ks`, normalised to sum 1 over `ks` (DESIGN.md shapes:
    equal lengths, population std; LIPO's sigma_batch and DAPO's token share cancel)."""
    from daro_lab.algorithms.losses import static_shape

    vals = np.array([static_shape(method, k / K, n_prompts, sigma_batch=1.0) for k in ks], dtype=float)
    return vals / vals.sum()


def reference_curve(method: str, K: int, n_prompts: int, ks: Sequence[int], mu: np.ndarray) -> np.ndarray:
    """The static shape on a fine mu grid, with the normaliser of `reference_shares` (the curve
    passes through the discrete reference points)."""
    from daro_lab.algorithms.losses import static_shape

    norm = sum(static_shape(method, k / K, n_prompts, sigma_batch=1.0) for k in ks)
    return np.array([static_shape(method, m, n_prompts, sigma_batch=1.0) for m in mu]) / norm


def _steps_table(runs_by_arm: dict, window) -> pd.DataFrame:
    rows = []
    for arm, members in runs_by_arm.items():
        per_run = []
        frames = {r.run_id: per_mu_frame(r, window) for r in members}
        arm_ks = sorted(set().union(*(set(f.k) for f in frames.values() if not f.empty)))
        for r in members:
            df = frames[r.run_id]
            if df.empty:
                continue
            sh = _shares(df, "C", absolute=True)
            n_mb = df.groupby("step").minibatch.nunique()
            s = sh.groupby(["step", "k"]).share.sum().unstack(fill_value=0.0)
            s = s.div(n_mb.reindex(s.index), axis=0)
            # a group absent from this run's step received nothing: share 0 (as in the window table)
            s = s.reindex(columns=arm_ks, fill_value=0.0).stack().rename("C_abs_share").reset_index()
            s["K"] = int(df.K.iloc[0])
            per_run.append(s)
        if not per_run:
            continue
        d = pd.concat(per_run)
        g = d.groupby(["step", "k", "K"]).C_abs_share
        agg = pd.DataFrame({"C_abs_share": g.mean(), "n_runs": g.size()}).reset_index()
        agg.insert(0, "arm", arm)
        agg.insert(1, "method", members[0].method)
        agg["mu"] = agg.k / agg.K
        rows.append(agg)
    if not rows:
        return pd.DataFrame(columns=["arm", "method", "step", "k", "K", "mu", "C_abs_share", "n_runs"])
    return pd.concat(rows, ignore_index=True)[["arm", "method", "step", "k", "K", "mu", "C_abs_share", "n_runs"]]


def loss_scale_tables(runs: RunSet, window: tuple[int, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """(per arm and mu, per arm/step/mu, static reference shares, notes)."""
    have, notes = require_table(runs, "per_mu", "loss-scale")
    arms = {a: [r for r in m if r in have] for a, m in runs.arms().items()}
    arms = {a: m for a, m in arms.items() if m}
    main = []
    for arm, members in arms.items():
        parts = []
        for r in members:
            s = run_summary(r, window)
            if not s.empty:
                s["run_id"] = r.run_id
                parts.append(s)
        if not parts:
            notes.append(f"{arm}: no per-mu rows in the window {window}")
            continue
        d = pd.concat(parts, ignore_index=True)
        cols = ["S_share", "C_abs_share", "G_share", "S_per_prompt", "prompts", "w", "wL", "wL_abs", "L"]
        g = d.groupby(["k", "K"])
        agg = g[cols].mean()
        # a run where a group never appears gives it share 0 (it received nothing); a run that never
        # measured the quantity (no G logged) is left out of that quantity's mean
        for c in ("S_share", "C_abs_share", "G_share"):
            per_run = d.pivot(index="run_id", columns="k", values=c)
            measured = per_run.notna().any(axis=1)
            means = per_run[measured].fillna(0.0).mean() if measured.any() else pd.Series(dtype=float)
            agg[c] = [means.get(k, np.nan) for k, _ in agg.index]
        agg["n_runs"] = g.size()
        agg = agg.reset_index()
        agg["mu"] = agg.k / agg.K
        tot = agg.S_per_prompt.sum()
        agg["S_share_per_prompt"] = agg.S_per_prompt / tot if tot > 0 else np.nan
        method = members[0].method
        N = members[0].param("trainer.mini_batch_prompts", 1, int)
        if method in STATIC_METHODS:
            agg["ref_share"] = reference_shares(method, int(agg.K.iloc[0]), N, agg.k.tolist())
        else:
            agg["ref_share"] = np.nan
        agg.insert(0, "arm", arm)
        agg.insert(1, "method", method)
        steps = pd.concat([per_mu_frame(r, window).step for r in members])
        agg["step_first"], agg["step_last"] = int(steps.min()), int(steps.max())
        main.append(agg)
    if not main:
        raise AnalysisError(f"loss-scale: no per-mu rows in the step window {window} for {runs.source}")
    table = pd.concat(main, ignore_index=True)[
        ["arm", "method", "k", "K", "mu", "n_runs", "step_first", "step_last", "prompts", "S_per_prompt",
         "S_share_per_prompt", "ref_share", "S_share", "C_abs_share", "G_share", "L", "w", "wL", "wL_abs"]]
    ref_rows = []
    for method in sorted(set(table.method) & set(STATIC_METHODS), key=style.method_rank):
        t = table[table.method == method]
        K = int(t.K.iloc[0])
        N = next(r for r in runs if r.method == method).param("trainer.mini_batch_prompts", 1, int)
        ks = sorted(t.k.unique())
        from daro_lab.algorithms.losses import static_shape

        for k, share in zip(ks, reference_shares(method, K, N, ks)):
            ref_rows.append({"method": method, "k": k, "K": K, "mu": k / K, "n_prompts": N,
                             "static_shape": static_shape(method, k / K, N, sigma_batch=1.0), "ref_share": share})
    ref = pd.DataFrame(ref_rows, columns=["method", "k", "K", "mu", "n_prompts", "static_shape", "ref_share"])
    return table, _steps_table(arms, window), ref, notes


def _caption(table: pd.DataFrame, window_txt: str) -> str:
    parts = []
    for arm, t in table.groupby("arm", sort=False):
        t = t.sort_values("mu")
        n_groups = len(t)
        top = t.loc[t.C_abs_share.idxmax()]
        txt = (f"under {arm}, the group μ={int(top.k)}/{int(top.K)} carries the largest share of |C_μ| "
               f"({top.C_abs_share:.0%}, equal shares would be {1 / n_groups:.0%})")
        if t.G_share.notna().any() and t.G_share.sum() > 0:
            gt = t.loc[t.G_share.idxmax()]
            txt += f" and μ={int(gt.k)}/{int(gt.K)} the largest share of the gradient norm ({gt.G_share:.0%})"
        if t.ref_share.notna().any():
            dev = float(np.nanmax(np.abs(t.S_share_per_prompt - t.ref_share)))
            pk = t.loc[t.S_share_per_prompt.idxmax()]
            txt += (f"; its per-prompt loss scale peaks at μ={int(pk.k)}/{int(pk.K)} and departs from the static "
                    f"shape by at most {dev:.3f} (in share)")
        if t.wL_abs.notna().any():
            wl = t.wL_abs.dropna()
            txt += f"; w_μ·|L_μ| spans {wl.min():.3g} to {wl.max():.3g} (DARO's balance point is 1)"
        parts.append(txt)
    refs = ("against the static shapes of DESIGN.md (dashed)" if table.ref_share.notna().any()
            else "(no static shape among these methods)")
    return (f"Loss scale by pass rate, {window_txt}. Top left: S_μ per prompt as a share (markers) {refs}. Then |C_μ| and G_μ as shares of the total per group "
            f"(grey dotted: equal shares), DARO's w_μ·|L_μ| (mean over the window's mini-batches), and each group's share of |C| over training. "
            + ("; ".join(parts)).capitalize()[:1] + "; ".join(parts)[1:] + ".")


def plot_loss_scale(runs: RunSet | None = None, out_dir: str | Path | None = None, *, uri: str | None = None,
                    experiment: str | None = None, run_ids: Sequence[str] | None = None,
                    window: tuple[int, int] | None = None) -> FigureResult:
    """Draw the loss-scale figure; save it (PNG, SVG, PDF) and its tables (CSV) in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    table, steps, ref, notes = loss_scale_tables(runs, window)
    arms = list(dict.fromkeys(table.arm))
    n_step_panels = len(arms)
    ncols = 3
    nrows = 2 + (max(n_step_panels - 2, 0) + ncols - 1) // ncols
    with style.paper_style():
        fig, axes = style.new_figure(nrows, ncols, height=2.1 * nrows + 0.5)
        ax_s, ax_c, ax_g = axes[0]
        ax_w = axes[1, 0]
        step_axes = [axes[1, 1], axes[1, 2]] + [a for row in axes[2:] for a in row]
        mu_fine = np.linspace(0.0, 1.0, 201)
        for arm in arms:
            t = table[table.arm == arm].sort_values("mu")
            st = runs.arm_style(arm)
            kw = dict(color=st["color"], marker=st["marker"], linestyle=st["linestyle"], label=arm)
            ax_s.plot(t.mu, t.S_share_per_prompt, **{**kw, "linestyle": "none"})
            method = t.method.iloc[0]
            if method in STATIC_METHODS:
                N = next(r for r in runs if r.arm == arm).param("trainer.mini_batch_prompts", 1, int)
                ax_s.plot(mu_fine, reference_curve(method, int(t.K.iloc[0]), N, t.k.tolist(), mu_fine),
                          color=st["color"], linestyle="--", linewidth=0.9, alpha=0.8)
            ax_c.plot(t.mu, t.C_abs_share, **kw)
            if t.G_share.notna().any():
                ax_g.plot(t.mu, t.G_share, **kw)
            if t.wL_abs.notna().any():
                ax_w.plot(t.mu, t.wL_abs, **kw)
        n_groups = table.groupby("arm").size().max()
        for ax in (ax_c, ax_g):
            ax.axhline(1 / n_groups, color="0.4", linestyle=":", linewidth=0.9, label="equal shares")
            ax.legend(handles=ax.get_lines()[-1:], loc="upper right")
        if set(table.method) & set(STATIC_METHODS):
            ax_s.plot([], [], color="0.3", linestyle="--", linewidth=0.9, label="static shape (DESIGN.md)")
            ax_s.legend(handles=ax_s.get_lines()[-1:], loc="lower center")
        ax_s.set(title="(a) loss scale S$_\\mu$ per prompt", ylabel="share (Σ over μ = 1)")
        ax_c.set(title="(b) |C$_\\mu$|: share of the loss", ylabel="share of Σ|C|")
        ax_g.set(title="(c) G$_\\mu$ = ‖∇C$_\\mu$‖: share", ylabel="share of Σ G")
        ax_w.set(title="(d) DARO: w$_\\mu$·|L$_\\mu$|",
                 ylabel="w$_\\mu$·|L$_\\mu$| (log)" if table.wL_abs.notna().any() else None)
        for ax in (ax_s, ax_c, ax_g, ax_w):
            ax.set_xlabel("pass rate μ")
            ax.set_xlim(0, 1)
        if not table.G_share.notna().any():
            style.empty_panel(ax_g, "no G_μ logged\n(trainer.grad_norm_every = 0?)")
            notes.append("no per-group gradient norms G_mu in these runs (trainer.grad_norm_every = 0)")
        if table.wL_abs.notna().any():
            style.log_axis(ax_w)
            ax_w.axhline(1.0, color="0.4", linestyle=":", linewidth=0.9, label="balance point")
            ax_w.legend(handles=ax_w.get_lines()[-1:], loc="best")
        else:
            style.empty_panel(ax_w, "no DARO run selected")
            notes.append("no DARO (or static-weight) run: panel (d), w_mu * |L_mu|, is empty")
        letters = "efghijklmnop"
        Ks = sorted(steps.K.unique()) if len(steps) else [2]
        for i, ax in enumerate(step_axes):
            if i >= len(arms):
                ax.set_visible(False)
                continue
            arm = arms[i]
            d = steps[steps.arm == arm]
            K = int(d.K.iloc[0]) if len(d) else 2
            colors = style.mu_colors(K)
            for k, dk in d.groupby("k"):
                ax.plot(dk.step, dk.C_abs_share, color=colors[int(k)], marker="o", markersize=2,
                        label=style.mu_label(int(k), K))
            ax.set(title=f"({letters[i]}) {arm}: share of |C| by step", xlabel="training step",
                   ylabel="share of Σ|C|", ylim=(-0.02, 1.02))
            if len(Ks) > 1:
                ax.legend(loc="upper right", ncol=2, fontsize=5.5)
        fig.legend(handles=style.arm_handles(runs, arms), loc="outside upper center", ncol=min(len(arms), 6))
        if len(Ks) == 1:
            span = "(e)" if len(arms) == 1 else f"(e)–({letters[len(arms) - 1]})"
            fig.legend(handles=style.mu_handles(int(Ks[0])), loc="outside lower center", ncol=int(Ks[0]) - 1,
                       title=f"panels {span}: pass-rate group")
    window_txt = (f"steps {window[0]}–{window[1]}" if window else
                  f"averaged over steps {int(table.step_first.min())}–{int(table.step_last.max())}")
    result = FigureResult(NAME, fig, {"loss_scale": table, "loss_scale_steps": steps, "loss_scale_reference": ref},
                          caption=_caption(table, window_txt), notes=notes,
                          summary={"arms": arms})
    return finish_figure(result, out_dir)
