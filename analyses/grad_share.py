"""Figure `grad-share`: how the update's gradient is shared between pass-rate groups, and how often clipping cuts it.

(a) Each group's share of the summed G_mu = ||grad_theta C_mu|| (column `gradnorm` of `per_mu`, measured every
`trainer.grad_norm_every` steps), against mu: the realised share of the update per group, whatever produced it
(how many prompts a group holds, the loss's static weighting, DARO's weights). (b) The same per prompt: G_mu over
the group's prompts in that mini-batch, as a share across groups: what a loss gives one prompt of each difficulty.
Both are means over the measured steps and the arm's runs; their CV across groups is in the caption. (c) The global
gradient norm before clipping (`grad/norm`, the mean over a step's updates) against the clip threshold
(`trainer.grad_clip`), with the fraction of updates the clip cut (metric `grad/clipped`, the share of a step's
updates whose norm exceeded the clip; runs recorded before it: the share of steps whose mean norm did): where
almost every update is clipped, reweighting the groups mostly rescales one direction that the clip then removes.
Tables `grad_share.csv` (arm, method, k, K, mu, g_share, g_share_per_prompt, n_steps) and `clipping.csv` (arm,
method, runs, steps, clipped_fraction, median_norm, clip, and the groups' gradient alignment: cos_mean, cos_p10,
cos_p90 over the measured steps of `grad/cos_mean`, cos_steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, finish_figure
from daro_lab.record import GRAD_CLIPPED, GRAD_NORM

NAME = "grad-share"
TOTAL, CLIPPED = GRAD_NORM, GRAD_CLIPPED
COS = "grad/cos_mean"  # mean pairwise cosine between the groups' grad C_mu, on the measured steps


def share_tables(runs: RunSet) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(per arm and k: mean share of G_mu per group and per prompt; per arm: clipping), notes."""
    shares, clips, notes = [], [], []
    for arm, members in runs.arms().items():
        method = members[0].method
        per_step = []
        for r in members:
            pm = r.per_mu_with("gradnorm")
            if pm is None:
                notes.append(f"run {r.name} ({r.run_id}) has no per-group gradient norms G_mu")
                continue
            d = pm[["step", "minibatch", "k", "K", "gradnorm", "prompts"]].copy()
            d["run"] = r.run_id
            key = ["run", "step", "minibatch"]
            d["g_share"] = d.gradnorm / d.groupby(key).gradnorm.transform("sum")
            per_prompt = d.gradnorm / d.prompts.where(d.prompts > 0)
            d["g_share_per_prompt"] = per_prompt / per_prompt.groupby([d[c] for c in key]).transform("sum")
            per_step.append(d)
        if per_step:
            d = pd.concat(per_step)
            g = (
                d.groupby(["k", "K"])
                .agg(
                    g_share=("g_share", "mean"),
                    g_share_per_prompt=("g_share_per_prompt", "mean"),
                    n_steps=("g_share", "size"),
                )
                .reset_index()
            )
            g.insert(0, "method", method)
            g.insert(0, "arm", arm)
            g.insert(4, "mu", g.k / g.K)
            shares.append(g)
        norms = [r.series(TOTAL) for r in members if r.has_metric(TOTAL)]
        if norms:
            v = pd.concat(norms).to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            clip = members[0].param("trainer.grad_clip", default=np.nan, cast=float)
            cut = [r.series(CLIPPED) for r in members if r.has_metric(CLIPPED)]
            if cut:  # the share of updates the clip cut, over every step of the arm's runs
                frac = float(np.nanmean(pd.concat(cut).to_numpy(dtype=float)))
            else:
                frac = float((v > clip).mean()) if clip and np.isfinite(clip) and clip > 0 else np.nan
            cos = [r.series(COS) for r in members if r.has_metric(COS)]  # on the grad_norm_every steps
            c = pd.concat(cos).to_numpy(dtype=float) if cos else np.array([])
            c = c[np.isfinite(c)]
            clips.append(
                {
                    "arm": arm,
                    "method": method,
                    "runs": len(norms),
                    "steps": len(v),
                    "clipped_fraction": frac,
                    "median_norm": float(np.median(v)) if len(v) else np.nan,
                    "clip": clip,
                    "cos_mean": float(c.mean()) if len(c) else np.nan,
                    "cos_p10": float(np.quantile(c, 0.1)) if len(c) else np.nan,
                    "cos_p90": float(np.quantile(c, 0.9)) if len(c) else np.nan,
                    "cos_steps": len(c),
                }
            )
    if not shares and not clips:
        raise AnalysisError(f"{NAME}: no run of {runs.source} logged G_mu (per_mu gradnorm) or {TOTAL}")
    share = (
        pd.concat(shares, ignore_index=True)
        if shares
        else pd.DataFrame(columns=["arm", "method", "k", "K", "mu", "g_share", "g_share_per_prompt", "n_steps"])
    )
    return share, pd.DataFrame(clips), notes


def _cv(x: pd.Series) -> float:
    x = x.dropna()
    return float(x.std(ddof=0) / x.mean()) if len(x) >= 2 and x.mean() > 0 else float("nan")


def _caption(share: pd.DataFrame, clips: pd.DataFrame) -> str:
    parts = []
    for arm, d in share.groupby("arm", sort=False):
        parts.append(
            f"{arm}: CV across groups {_cv(d.g_share):.2f} per group, {_cv(d.g_share_per_prompt):.2f} per prompt"
        )
    clip = [
        f"{r.arm} {r.clipped_fraction:.0%} (median norm {r.median_norm:.3g} over {r.steps} steps, clip {r.clip:g})"
        for r in clips.itertuples()
        if np.isfinite(r.clipped_fraction)
    ]
    cos = [
        f"{r.arm} {r.cos_mean:.2f} (10th-90th percentile {r.cos_p10:.2f} to {r.cos_p90:.2f}, {r.cos_steps} steps)"
        for r in clips.itertuples()
        if "cos_mean" in clips and np.isfinite(r.cos_mean)
    ]
    unmeasured = [r.arm for r in clips.itertuples() if not ("cos_mean" in clips and np.isfinite(r.cos_mean))]
    return (
        "Share of the update's gradient per pass-rate group, G_μ = ‖∇θ C_μ‖ over the sum across groups, (a) per "
        "group and (b) per prompt (mean over the measured steps and runs); (c) the gradient norm before "
        "clipping. "
        + "; ".join(parts)
        + "."
        + (" Updates clipped: " + "; ".join(clip) + "." if clip else "")
        + (
            " Mean pairwise cosine between the groups' gradients of C_μ (grad/cos_mean; 1: one direction, which a "
            "binding clip rescales whatever the weights): " + "; ".join(cos) + "."
            if cos
            else ""
        )
        + (
            f" The groups' gradient cosine was not measured for {', '.join(unmeasured)} (it is logged on the steps "
            "that measure G_μ, every trainer.grad_norm_every steps), so this figure says nothing of their alignment."
            if unmeasured
            else ""
        )
    )


def plot_grad_share(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> FigureResult:
    """Draw the grad-share figure; save it and its tables in `out_dir`."""
    runs = as_runset(runs, uri, experiment, run_ids)
    share, clips, notes = share_tables(runs)
    arms = list(dict.fromkeys(list(share.arm) + list(clips.arm if len(clips) else [])))
    with style.paper_style():
        fig, axes = style.new_figure(1, 3, height=2.6)
        for ax, col, title in (
            (axes[0][0], "g_share", "(a) share of G$_\\mu$ per group"),
            (axes[0][1], "g_share_per_prompt", "(b) share of G$_\\mu$ per prompt"),
        ):
            for arm in arms:
                d = share[share.arm == arm].sort_values("mu")
                if d.empty:
                    continue
                st = runs.arm_style(arm)
                ax.plot(d.mu, d[col], color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3)
            ax.set(title=title, xlabel="pass rate μ", ylabel="share (sums to 1 over groups)")
            if share.empty:
                style.empty_panel(ax, "no G_mu logged (trainer.grad_norm_every = 0)")
        ax = axes[0][2]
        for r in runs:
            if not r.has_metric(TOTAL):
                continue
            s = r.series(TOTAL)
            st = runs.arm_style(r.arm)
            ax.plot(s.index, s.to_numpy(), color=st["color"], linestyle=st["linestyle"], linewidth=0.6, alpha=0.7)
        if len(clips):
            for c in sorted(set(clips["clip"].dropna())):
                if c > 0:
                    ax.axhline(c, color="0.3", linestyle=":", linewidth=0.9)
            style.log_axis(ax)
        else:
            style.empty_panel(ax, f"no {TOTAL} logged")
        ax.set(title="(c) pre-clip gradient norm", xlabel="training step", ylabel="‖∇θ loss‖ (log; dotted: clip)")
        style.arm_legend(fig, runs, arms)
    return finish_figure(
        FigureResult(NAME, fig, {"grad_share": share, "clipping": clips}, caption=_caption(share, clips), notes=notes),
        out_dir,
    )
