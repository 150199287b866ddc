"""Figure `simulate`: the loss scale and DARO's weights on synthetic mini-batches (daro_lab.simulate).

Unlike the other analyses this one reads no run: it draws what `daro_lab.simulate.simulate` computed from
the lengths you give. Panels: (a) S_mu per prompt as a share over mu for each baseline, against its
equal-length shape (dashed) and its length-corrected shape (dotted, from the given lengths); (b) |C_mu| as a
share of the loss (coefficient part only: DARO's offset -C ln w, which has no theta-gradient, is left out);
(c) L_mu; then one panel per DARO reading: the weights over updates, each with its fixed point C / signal
(the window mean of the last tenth of the updates) as a dotted line.

Tables: `simulate_summary.csv` (per run and k, window means) and `simulate_groups.csv` (every update).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import FigureResult, finish_figure

NAME = "simulate"


def reached(summary: pd.DataFrame, run: str, tol: float = 0.05) -> bool:
    """True when every group's w * signal / C is within `tol` of 1 over the window (the fixed point)."""
    d = summary[summary.run == run]
    return bool(len(d) and d.wS.notna().all() and (d.wS - 1).abs().max() <= tol)


def plot_simulation(result, out_dir: str | Path | None = None) -> FigureResult:
    """Draw a `SimResult`; save it (PNG, SVG, PDF) and its tables (CSV) into `out_dir`."""
    from daro_lab.simulate import BASELINES, reach_limit

    cfg, groups = result.config, result.groups
    summary = result.summary()
    K = cfg.K
    readings = [r for r in dict.fromkeys(groups.run) if r not in BASELINES]
    n_rows = 1 + (len(readings) + 2) // 3
    with style.paper_style():
        fig, axes = style.new_figure(n_rows, 3, height=2.15 * n_rows + 0.4)
        ax_s, ax_c, ax_l = axes[0]
        for run in dict.fromkeys(summary.run):
            t = summary[summary.run == run].sort_values("mu")
            if run in BASELINES:
                c = style.method_color(run)
                ax_s.plot(t.mu, t.S_share, color=c, marker="o", linestyle="none", label=style.method_label(run))
                ax_s.plot(t.mu, t.equal_length_share, color=c, linestyle="--", linewidth=0.9)
                ax_s.plot(t.mu, t.length_corrected_share, color=c, linestyle=":", linewidth=1.1)
                ax_l.plot(t.mu, t.L, color=c, marker="o", label=style.method_label(run))
                if t.C_abs_share.notna().any():
                    ax_c.plot(t.mu, t.C_abs_share, color=c, marker="o", label=style.method_label(run))
            else:
                ax_c.plot(
                    t.mu,
                    t.C_abs_share,
                    color=style.method_color("daro"),
                    marker=".",
                    alpha=0.6,
                    linestyle=style.LINESTYLES[readings.index(run) % len(style.LINESTYLES)],
                    label=run,
                )
        ax_c.axhline(1 / (K - 1), color="0.4", linestyle=":", linewidth=0.9)
        ax_s.set(title="(a) S$_\\mu$ per prompt: share over μ", ylabel="share", xlabel="pass rate μ")
        from matplotlib.lines import Line2D

        h, _ = ax_s.get_legend_handles_labels()
        h += [
            Line2D([], [], color="0.3", linestyle="--", label="equal lengths"),
            Line2D([], [], color="0.3", linestyle=":", label="given lengths"),
        ]
        ax_s.legend(handles=h, loc="lower center", fontsize=5.5, ncol=2)
        ax_c.set(title="(b) |C$_\\mu$| share (coefficient part)", ylabel="share of Σ|C|", xlabel="pass rate μ")
        spare = [a for row in axes[1:] for a in row][len(readings) :]  # grid cells no reading uses
        if spare:  # (b)'s legend in a free cell, off the data
            spare[0].set_axis_off()
            spare[0].legend(*ax_c.get_legend_handles_labels(), loc="center", fontsize=6, title="lines of (b)")
        else:
            ax_c.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=5, ncol=2)
        ax_l.set(title="(c) L$_\\mu$ (token-mean loss)", ylabel="L$_\\mu$", xlabel="pass rate μ")
        ax_l.axhline(0, color="0.4", linewidth=0.6)
        colors = style.mu_colors(K)
        letters = "defghijklmnop"
        panels = [a for row in axes[1:] for a in row]
        for i, ax in enumerate(panels):
            if i >= len(readings):
                if ax is not (spare[0] if spare else None):
                    ax.set_visible(False)
                continue
            run = readings[i]
            d = groups[groups.run == run]
            s = summary[summary.run == run]
            for k, dk in d.groupby("k"):
                ax.plot(dk["update"], dk["daro/weight_used"], color=colors[int(k)], linewidth=1.0)
                row = s[s.k == k]
                if len(row) and np.isfinite(row.wS.iloc[0]) and row.wS.iloc[0] > 0:
                    target = float(row.w_final.iloc[0] / row.wS.iloc[0])  # C / signal over the window
                    ax.axhline(target, color=colors[int(k)], linestyle=":", linewidth=0.8)
            verdict = "reached" if reached(summary, run) else "not reached"
            ax.set(title=f"({letters[i]}) {run}\nfixed point {verdict}", xlabel="update", ylabel="w$_\\mu$")
            style.log_axis(ax)
        fig.legend(
            handles=style.mu_handles(K),
            loc="outside lower center",
            ncol=K - 1,
            title="weights by pass-rate group (dotted: fixed point C / signal)",
        )
    lc, lw = cfg.lengths("correct"), cfg.lengths("wrong")
    zero = [
        style.method_label(r)
        for r in BASELINES
        if r in set(summary.run) and summary[summary.run == r].C_abs_share.isna().all()
    ]
    parts = []
    for run in readings:
        s = summary[summary.run == run]
        parts.append(
            f"{run}: w from {s.w_final.min():.3g} to {s.w_final.max():.3g}, max |w·signal/C − 1| "
            f"{(s.wS - 1).abs().max():.3g} ({'reached' if reached(summary, run) else 'not reached'})"
        )
    hidden = []  # curves drawn on top of each other
    base = [r for r in dict.fromkeys(summary.run) if r in BASELINES]
    for panel, col in (("(a)", "S_share"), ("(b)", "C_abs_share"), ("(c)", "L")):
        curves = {style.method_label(r): summary[summary.run == r].sort_values("mu")[col].to_numpy() for r in base}
        curves = {k: v for k, v in curves.items() if np.isfinite(v).any()}
        hidden += [f"in {panel} {a} and {b} coincide" for a, b in style.coinciding(curves, 2e-3)]
    for i, run in enumerate(readings):
        d = groups[groups.run == run].pivot_table(index="update", columns="k", values="daro/weight_used")
        if d.shape[1] > 1 and float((d.max(axis=1) / d.min(axis=1)).max()) <= 1.03:
            hidden.append(f"in ({letters[i]}) every group's weight lies within 3% of the others' (one curve)")
    caption = (
        f"Simulated loss scale, K={K}, {cfg.prompts} prompts per mini-batch, {cfg.updates} updates, lengths "
        f"of right answers {_span(lc)} and of wrong ones {_span(lw)} tokens (CV {cfg.len_cv:g}), "
        f"log-ratio noise {cfg.ratio_noise:g}. Window: the last tenth of the updates. DARO's weights step by "
        f"AdamW at lr_w {cfg.lr_w:g}, so |ln w| can move by at most about {reach_limit(cfg.lr_w, cfg.updates):.3g} "
        f"(lr_w × updates). "
        + "; ".join(parts)
        + "."
        + (
            f" Not drawn in (b): {', '.join(zero)}, whose loss is 0 up to rounding here (at ρ = 1 its advantages "
            "sum to 0 within each group)."
            if zero
            else ""
        )
        + (f" Curves that hide each other: {'; '.join(hidden)}." if hidden else "")
    )
    res = FigureResult(
        NAME,
        fig,
        {"simulate_summary": summary, "simulate_groups": groups},
        caption=caption,
        summary={"reached": {r: reached(summary, r) for r in readings}},
    )
    return finish_figure(res, out_dir)


def _span(v: list[float]) -> str:
    return f"{v[0]:g}" if min(v) == max(v) else f"{min(v):g}–{max(v):g}"
