"""Figure `loss-scale`: how much of the loss, and of the gradient, each pass-rate group gets.

Read from each run's `per_mu` table (one row per step, mini-batch and group k):

- S_mu per prompt (S / prompts) as a share over the groups present in each mini-batch, averaged over the
  window's mini-batches (then renormalised over mu): the loss scale a *single prompt* at mu gets. For the
  baselines, the same aggregation of two predictions from the same rows: the static shape at equal lengths
  (`static_shape`, docs/math.md) and the length-corrected shape from the group's logged lengths of right and
  wrong answers (`length_corrected_shape`: k A+ L+ + (K-k)|A-| L-, per response token-mean for GRPO).
  What each comparison can show: GRPO's measured shape equals its static shape at any lengths (its per-response
  token-mean cancels them): an algebraic identity, drawn as a consistency check. DAPO, Dr. GRPO and LIPO sum
  over tokens, so unequal lengths move them off the equal-length shape: that departure is the measurement, and
  it can be 0 (equal lengths) or not; their match with the length-corrected shape is again a consistency check
  of the accounting (both come from the same rows).
- S_mu as a share of the total (what the group receives, prompt counts included), pooled over the window.
- |C_mu| as a share of the loss: the coefficient part only, C_mu minus DARO's offset -C ln w_mu (recorded apart
  as `contrib_offset/`), which adds to the loss's value but carries no theta-gradient. Pooled over the window:
  each group's sum of |C| over the window's mini-batches over the sum over groups, so a mini-batch whose loss
  is near 0 weighs nothing (GRPO's on-policy mini-batch: at rho = 1 its advantages sum to 0 within every group
  and C_mu = 0 up to float rounding). An arm whose whole window has C = 0 up to rounding gets no share.
- G_mu = ||grad C_mu|| as a share, pooled the same way over the mini-batches where G was measured.
- DARO: w_mu * signal_mu / C (1 at the fixed point w = C / signal of the reading the run used; older runs
  without it: w_mu * |L_mu|, the paper's reading).
- a panel per arm over steps: each group's share of |C| (coefficient part) per step, pooled over the step.

Every quantity is computed per run, then averaged over the arm's runs (seeds). The tables are
`loss_scale.csv` (per arm and mu), `loss_scale_steps.csv` (per arm, step and mu) and
`loss_scale_reference.csv` (the static shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure, require_table
from daro_lab.algorithms import METHODS, shaped_methods
from daro_lab.record import normalise_per_mu

NAME = "loss-scale"
ROUNDING = 1e-9  # a total |C| below this times the loss mass S is float rounding, not a loss


def per_mu_frame(run, window: tuple[int, int] | None = None) -> pd.DataFrame:
    """The run's per_mu rows within the step window (inclusive), with interior k only, and the coefficient part
    of C (`C_coef` = contrib - contrib_offset; contrib itself for runs that recorded no offset)."""
    df = run.table("per_mu")
    if df is None:
        return pd.DataFrame()
    df = normalise_per_mu(df[(df.k > 0) & (df.k < df.K)]).copy()
    if window is not None:
        df = df[(df.step >= window[0]) & (df.step <= window[1])]
    offset = df["contrib_offset"].fillna(0.0) if "contrib_offset" in df.columns else 0.0
    df["C_coef"] = df["contrib"] - offset
    return df


def _minibatch_shares(df: pd.DataFrame, values: pd.Series) -> pd.Series:
    """Per row: the value over the sum over the groups of its (step, mini-batch); NaN where that sum is 0."""
    tot = values.groupby([df.step, df.minibatch]).transform("sum")
    return values / tot.where(tot > 0)


def _pooled(df: pd.DataFrame, col: str) -> pd.Series | None:
    """{k: sum of |col| over the rows / sum over every group}; None when the column is missing or all NaN."""
    if col not in df.columns or df[col].isna().all():
        return None
    v = df[col].abs()
    tot = v.sum()
    return (v.groupby(df.k).sum() / tot) if tot > 0 else None


def _prompt_shapes(df: pd.DataFrame, method: str, std: str, eps: float) -> pd.DataFrame:
    """Per row, per-prompt S (measured), the equal-length static shape and the length-corrected shape, each
    as a share over the groups of its mini-batch."""
    from daro_lab.algorithms import length_corrected_shape, static_shape

    out = pd.DataFrame(index=df.index)
    out["measured"] = _minibatch_shares(df, df.scale / df.prompts)
    if method in shaped_methods():
        eq = pd.Series([static_shape(method, k / K, 1, sigma_batch=1.0) for k, K in zip(df.k, df.K)], index=df.index)
        lc = pd.Series(
            [
                length_corrected_shape(method, int(k), int(K), a, b, std, eps)
                for k, K, a, b in zip(df.k, df.K, df.len_correct, df.len_incorrect)
            ],
            index=df.index,
        )
        out["equal_length"] = _minibatch_shares(df, eq)
        out["length_corrected"] = _minibatch_shares(df, lc)
    return out


def run_summary(run, window: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per group k of one run: the window's shares and means (module docstring)."""
    df = per_mu_frame(run, window)
    if df.empty:
        return pd.DataFrame()
    K = int(df.K.iloc[0])
    ks = sorted(df.k.unique())
    out = pd.DataFrame({"k": ks})
    out["K"] = K
    out["mu"] = out.k / K
    shapes = _prompt_shapes(df, run.method, run.param("algo.std", "unbiased"), run.param("algo.adv_eps", 1e-6, float))
    for col, name in (
        ("measured", "S_share_per_prompt"),
        ("equal_length", "ref_share"),
        ("length_corrected", "lc_share"),
    ):
        if col in shapes:
            m = shapes[col].groupby(df.k).mean()
            out[name] = out.k.map(m / m.sum())
        else:
            out[name] = np.nan
    sp = _pooled(df, "scale")
    out["S_share"] = np.nan if sp is None else out.k.map(sp).fillna(0.0)
    c = _pooled(df, "C_coef")
    c_zero = c is None or df.C_coef.abs().sum() <= ROUNDING * df.scale.abs().sum()
    out["C_abs_share"] = np.nan if c_zero else out.k.map(c).fillna(0.0)
    g = _pooled(df.dropna(subset=["gradnorm"]) if "gradnorm" in df.columns else df, "gradnorm")
    out["G_share"] = np.nan if g is None else out.k.map(g).fillna(0.0)
    present = df.groupby("k")
    out["S_per_prompt"] = out.k.map((df.scale / df.prompts).groupby(df.k).mean())
    out["prompts"] = out.k.map(present.prompts.mean())
    for col in (
        "daro/weight_used",
        "daro/wL",
        "loss",
        "daro/wS",
        "mass",
        "daro/signal",
        "len_correct",
        "len_incorrect",
    ):
        out[col] = out.k.map(present[col].mean()) if col in df.columns else np.nan
    out["wL_abs"] = out.k.map(df["daro/wL"].abs().groupby(df.k).mean()) if "daro/wL" in df.columns else np.nan
    out["rows"] = out.k.map(present.size())
    return out


def reference_shares(method: str, K: int, n_prompts: int, ks: Sequence[int]) -> np.ndarray:
    """static_shape(method, k/K, N) for k in `ks`, normalised to sum 1 over `ks` (docs/math.md shapes:
    equal lengths, population std; LIPO's sigma_batch and DAPO's token share cancel)."""
    from daro_lab.algorithms.losses import static_shape

    vals = np.array([static_shape(method, k / K, n_prompts, sigma_batch=1.0) for k in ks], dtype=float)
    return vals / vals.sum()


STEP_SMOOTHING = 10  # panels (e)-: steps in the centred rolling mean drawn (the table keeps every step)


def _steps_table(runs_by_arm: dict, window) -> pd.DataFrame:
    """Per arm, step and k: each group's share of the step's |C| (coefficient part, pooled over the step's
    mini-batches), mean over the arm's runs; steps where C is 0 up to rounding are left out."""
    rows = []
    for arm, members in runs_by_arm.items():
        per_run = []
        frames = {r.run_id: per_mu_frame(r, window) for r in members}
        arm_ks = sorted(set().union(*(set(f.k) for f in frames.values() if not f.empty)))
        for r in members:
            df = frames[r.run_id]
            if df.empty:
                continue
            c = df.C_coef.abs().groupby([df.step, df.k]).sum().unstack(fill_value=0.0)
            mass = df.scale.abs().groupby(df.step).sum().reindex(c.index)
            tot = c.sum(axis=1)
            s = c[tot > ROUNDING * mass].div(tot[tot > ROUNDING * mass], axis=0)
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


SHARES = ("S_share", "C_abs_share", "G_share")  # what each group receives: 0 in a run where it never appears
PROMPT_SHARES = ("S_share_per_prompt", "ref_share", "lc_share")  # per prompt: mean over the runs that had the group
MEANS = (
    "S_per_prompt",
    "prompts",
    "daro/weight_used",
    "daro/wL",
    "wL_abs",
    "daro/wS",
    "loss",
    "mass",
    "daro/signal",
    "len_correct",
    "len_incorrect",
)


def loss_scale_tables(
    runs: RunSet, window: tuple[int, int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
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
        g = d.groupby(["k", "K"])
        agg = g[list(MEANS)].mean()
        # a run where a group never appears gives it share 0 (it received nothing); a run that never
        # measured the quantity (no G logged, C = 0 up to rounding) is left out of that quantity's mean
        for c in SHARES:
            per_run = d.pivot(index="run_id", columns="k", values=c)
            measured = per_run.notna().any(axis=1)
            means = per_run[measured].fillna(0.0).mean() if measured.any() else pd.Series(dtype=float)
            agg[c] = [means.get(k, np.nan) for k, _ in agg.index]
        for c in PROMPT_SHARES:
            m = g[c].mean()
            agg[c] = m / m.sum() if m.notna().any() else np.nan
        agg["n_runs"] = g.size()
        agg = agg.reset_index()
        agg["mu"] = agg.k / agg.K
        method = members[0].method
        agg.insert(0, "arm", arm)
        agg.insert(1, "method", method)
        steps = pd.concat([per_mu_frame(r, window).step for r in members])
        agg["step_first"], agg["step_last"] = int(steps.min()), int(steps.max())
        main.append(agg)
    if not main:
        raise AnalysisError(f"loss-scale: no per-mu rows in the step window {window} for {runs.source}")
    table = pd.concat(main, ignore_index=True)[
        [
            "arm",
            "method",
            "k",
            "K",
            "mu",
            "n_runs",
            "step_first",
            "step_last",
            "prompts",
            "S_per_prompt",
            "S_share_per_prompt",
            "ref_share",
            "lc_share",
            "S_share",
            "C_abs_share",
            "G_share",
            "loss",
            "len_correct",
            "len_incorrect",
            "mass",
            "daro/weight_used",
            "daro/wL",
            "wL_abs",
            "daro/signal",
            "daro/wS",
        ]
    ]
    ref_rows = []
    for method in sorted(set(table.method) & set(shaped_methods()), key=style.method_rank):
        t = table[table.method == method]
        K = int(t.K.iloc[0])
        N = next(r for r in runs if r.method == method).param("trainer.mini_batch_prompts", 1, int)
        ks = sorted(t.k.unique())
        from daro_lab.algorithms.losses import static_shape

        for k, share in zip(ks, reference_shares(method, K, N, ks)):
            ref_rows.append(
                {
                    "method": method,
                    "k": k,
                    "K": K,
                    "mu": k / K,
                    "n_prompts": N,
                    "static_shape": static_shape(method, k / K, N, sigma_batch=1.0),
                    "ref_share": share,
                }
            )
    ref = pd.DataFrame(ref_rows, columns=["method", "k", "K", "mu", "n_prompts", "static_shape", "ref_share"])
    return table, _steps_table(arms, window), ref, notes


def _caption(table: pd.DataFrame, window_txt: str) -> str:
    parts = []
    for arm, t in table.groupby("arm", sort=False):
        t = t.sort_values("mu")
        n_groups = len(t)
        if t.C_abs_share.notna().any():
            top = t.loc[t.C_abs_share.idxmax()]
            txt = (
                f"under {arm}, the group μ={int(top.k)}/{int(top.K)} carries the largest share of |C_μ| "
                f"({top.C_abs_share:.0%}, equal shares would be {1 / n_groups:.0%})"
            )
        else:
            txt = f"under {arm}, C_μ is 0 up to rounding in the window (no share drawn)"
        if t.G_share.notna().any() and t.G_share.sum() > 0:
            gt = t.loc[t.G_share.idxmax()]
            txt += f" and μ={int(gt.k)}/{int(gt.K)} the largest share of the gradient norm ({gt.G_share:.0%})"
        if t.ref_share.notna().any():
            dev = float(np.nanmax(np.abs(t.S_share_per_prompt - t.ref_share)))
            lc = float(np.nanmax(np.abs(t.S_share_per_prompt - t.lc_share)))
            if not METHODS[t.method.iloc[0]].token_sum:
                txt += (
                    f"; its per-prompt S_μ is on its static shape to {dev:.1g} in share (a consistency check: "
                    "GRPO's per-response token-mean makes this hold at any lengths)"
                )
            else:
                txt += (
                    f"; its per-prompt S_μ departs from the equal-length shape by up to {dev:.3f} in share (the "
                    f"effect of the lengths of right and wrong answers) and is on the length-corrected shape to "
                    f"{lc:.1g} (a consistency check: both come from the same logged lengths)"
                )
        if t["daro/wS"].notna().any():
            ws = t["daro/wS"].dropna()
            txt += f"; w_μ·signal_μ/C spans {ws.min():.3g} to {ws.max():.3g} (1 at DARO's fixed point)"
        elif t.wL_abs.notna().any():
            wl = t.wL_abs.dropna()
            txt += (
                f"; w_μ·|L_μ| spans {wl.min():.3g} to {wl.max():.3g} (DARO's fixed point with the paper's reading is 1)"
            )
        parts.append(txt)
    refs = (
        "against the equal-length static shapes (dashed) and the shapes corrected for the logged lengths (dotted)"
        if table.ref_share.notna().any()
        else "(no static shape among these methods)"
    )
    return (
        f"Loss scale by pass rate, {window_txt}. Top left: S_μ per prompt as a share (markers) {refs}. Then "
        "|C_μ| (the part with a θ-gradient: DARO's offset −C ln w is left out; pooled over mini-batches, so a "
        "mini-batch whose loss is ~0 weighs nothing) and G_μ as shares of the total per group (grey dotted: "
        "equal shares), DARO's w_μ·signal_μ/C (mean over the window), and each group's share of |C| over "
        "training. " + ("; ".join(parts))[:1].upper() + "; ".join(parts)[1:] + "."
    )


def plot_loss_scale(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    window: tuple[int, int] | None = None,
) -> FigureResult:
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
        for arm in arms:
            t = table[table.arm == arm].sort_values("mu")
            st = runs.arm_style(arm)
            kw = dict(color=st["color"], marker=st["marker"], linestyle=st["linestyle"], label=arm)
            ax_s.plot(t.mu, t.S_share_per_prompt, **{**kw, "linestyle": "none"})
            method = t.method.iloc[0]
            if method in shaped_methods():
                ax_s.plot(t.mu, t.ref_share, color=st["color"], linestyle="--", linewidth=0.9, alpha=0.8)
                if METHODS[method].token_sum:
                    ax_s.plot(t.mu, t.lc_share, color=st["color"], linestyle=":", linewidth=1.1, alpha=0.9)
            if t.C_abs_share.notna().any():
                ax_c.plot(t.mu, t.C_abs_share, **kw)
            if t.G_share.notna().any():
                ax_g.plot(t.mu, t.G_share, **kw)
            if t["daro/wS"].notna().any():
                ax_w.plot(t.mu, t["daro/wS"], **kw)
            elif t.wL_abs.notna().any():
                ax_w.plot(t.mu, t.wL_abs, **kw)
        # equal shares: 1 / (groups of the arm); one line per group count when the arms' K differ, each labelled
        counts = sorted(set(table.groupby("arm").size()), reverse=True)
        for ax in (ax_c, ax_g):
            for n in counts:
                ax.axhline(1 / n, color="0.4", linestyle=":", linewidth=0.9)
                if len(counts) > 1:
                    ax.annotate(
                        f"1/{n}",  # beside the axes, off the curves (the caption: grey dotted, equal shares)
                        (1.01, 1 / n),
                        xycoords=("axes fraction", "data"),
                        ha="left",
                        va="center",
                        annotation_clip=False,
                        fontsize=5.5,
                        color="0.35",
                    )
            if len(counts) == 1:  # several: each line carries its own label, no legend box over the curves
                ax.legend(
                    handles=[Line2D([], [], color="0.4", linestyle=":", linewidth=0.9, label="equal shares")],
                    loc="best",
                )
        if set(table.method) & set(shaped_methods()):
            ax_s.plot([], [], color="0.3", linestyle="--", linewidth=0.9, label="equal lengths")
            ax_s.plot([], [], color="0.3", linestyle=":", linewidth=1.1, label="logged lengths")
            ax_s.legend(handles=ax_s.get_lines()[-2:], loc="best", fontsize=5.5)
        ax_s.set(title="(a) loss scale S$_\\mu$ per prompt", ylabel="share (Σ over μ = 1)")
        ax_c.set(title="(b) |C$_\\mu$|: share of the loss", ylabel="share of Σ|C| (θ-part)")
        ax_g.set(title="(c) G$_\\mu$ = ‖∇C$_\\mu$‖: share", ylabel="share of Σ G")
        paper_reading = table["daro/wS"].isna().all()
        ax_w.set(
            title="(d) DARO: w$_\\mu$·|L$_\\mu$|" if paper_reading else "(d) DARO: w$_\\mu$·signal$_\\mu$/C",
            ylabel="balance (log)" if table.wL_abs.notna().any() else None,
        )
        for ax in (ax_s, ax_c, ax_g, ax_w):
            ax.set_xlabel("pass rate μ")
            ax.set_xlim(0, 1)
        if not table.G_share.notna().any():
            style.empty_panel(ax_g, "no G_μ logged\n(trainer.grad_norm_every = 0?)")
            notes.append("no per-group gradient norms G_mu in these runs (trainer.grad_norm_every = 0)")
        if table.wL_abs.notna().any() or table["daro/wS"].notna().any():
            style.log_axis(ax_w)
            ax_w.axhline(1.0, color="0.4", linestyle=":", linewidth=0.9, label="fixed point")
            ax_w.legend(handles=ax_w.get_lines()[-1:], loc="best")
        else:
            style.empty_panel(ax_w, "no DARO run selected")
            notes.append("no DARO (or static-weight) run: panel (d), DARO's balance, is empty")
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
            for k, dk in d.groupby("k"):  # one step's shares swing with its few prompts: a centred rolling mean
                dk = dk.sort_values("step")
                ax.plot(
                    dk.step,
                    dk.C_abs_share.rolling(STEP_SMOOTHING, min_periods=1, center=True).mean(),
                    color=colors[int(k)],
                    label=style.mu_label(int(k), K),
                )
            title = f"({letters[i]}) {arm}: share of |C| by step"
            ax.set(
                title=style.wrap(title, style.title_chars(style.PAGE_WIDTH, ncols)),
                xlabel="training step",
                ylabel=f"share of Σ|C| ({STEP_SMOOTHING}-step mean)",
                ylim=(-0.02, 1.02),
            )
        style.arm_legend(fig, runs, arms)
        span = "(e)" if len(arms) == 1 else f"(e)–({letters[len(arms) - 1]})"
        if len(Ks) > 1:
            style.mu_colorbar(fig, [ax for ax in step_axes if ax.get_visible()], f"panels {span}")
        else:
            fig.legend(
                handles=style.mu_handles(int(Ks[0])),
                loc="outside lower center",
                ncol=int(Ks[0]) - 1,
                title=f"panels {span}: pass-rate group",
            )
    window_txt = (
        f"steps {window[0]}–{window[1]}"
        if window
        else f"averaged over steps {int(table.step_first.min())}–{int(table.step_last.max())}"
    )
    result = FigureResult(
        NAME,
        fig,
        {"loss_scale": table, "loss_scale_steps": steps, "loss_scale_reference": ref},
        caption=_caption(table, window_txt),
        notes=notes,
        summary={"arms": arms},
    )
    return finish_figure(result, out_dir)
