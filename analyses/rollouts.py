"""Figure `rollouts`: the loss scale issue on a run daro-lab never trained, from its rollout dump
(`daro_lab.integrations.rollouts`; `daro-lab analyze-rollouts PATH`).

Panels: (a) the prompts' pass-rate distribution by step (share of each step's prompts at each k, k = 0 and K
included); (b) the mean length of right and of wrong answers by pass rate (the unit, tokens of a given tokenizer or
characters / words when none is given, is on the axis); (c) each baseline's loss scale S_mu per prompt as a share
over mu, measured by the real loss on every step of the dump (markers), against its equal-length static shape
(dashed) and its length-corrected shape from the dump's mean lengths (dotted); (d) each group's share of the summed
S_mu, prompt counts included: what each pass rate receives; (e) DARO's weights after the simulated updates, by pass
rate, under each reading of its signal (`daro_lab.simulate` on mini-batches shaped like the dump); (f) w·signal/C
over the last tenth of the updates (1: the fixed point).

Tables: `rollout_scale.csv` (per method and k), `rollout_scale_steps.csv` (per method, step and k),
`rollout_mu_hist.csv`, `rollout_lengths.csv`, `rollout_groups.csv` (per prompt group: step, prompt, k, first line),
and with the simulation `rollout_daro.csv` (the simulator's summary) and `rollout_sim_config.csv`; the simulator's own
figure goes to `<out>/simulate/`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from analyses.runs import FigureResult, finish_figure

NAME = "rollouts"


def plot_rollouts(analysis, out_dir: str | Path | None = None) -> FigureResult:
    """Draw a `RolloutAnalysis`; save it (PNG, SVG, PDF) and its tables (CSV) into `out_dir`."""
    data, K = analysis.data, analysis.data.K
    hist, lens, scale = analysis.mu_hist, analysis.lengths, analysis.scale
    sim = analysis.simulation
    summary = sim.summary() if sim is not None else None
    readings = (
        []
        if summary is None
        else [
            r
            for r in dict.fromkeys(summary.run)
            if "w_final" in summary and summary[summary.run == r].w_final.notna().any()
        ]
    )
    with style.paper_style():
        fig, axes = style.new_figure(2, 3, height=4.9)
        ax_h, ax_l, ax_s = axes[0]
        ax_g, ax_w, ax_f = axes[1]
        colors = {**style.mu_colors(K), 0: "0.25", K: "0.8"}
        wide = hist.pivot(index="step", columns="k", values="share").reindex(columns=range(K + 1), fill_value=0.0)
        steps = wide.index.to_numpy()
        if len(steps) > 1:
            ax_h.stackplot(steps, wide.T.to_numpy(), colors=[colors[k] for k in range(K + 1)], linewidth=0)
            ax_h.set_xlim(steps.min(), steps.max())
        else:
            bottom = 0.0
            for k in range(K + 1):
                ax_h.bar(steps, wide[k].to_numpy(), bottom=bottom, color=colors[k], width=0.6)
                bottom = bottom + wide[k].to_numpy()
        ax_h.set(title="(a) prompts by pass rate", xlabel="step", ylabel="share of the step's prompts", ylim=(0, 1))
        for name, ls, mk, color, label in (
            ("correct", "-", "o", "#1b9e77", "right answers"),
            ("incorrect", "--", "s", "#d95f02", "wrong answers"),
        ):
            d = lens[np.isfinite(lens[f"len_{name}"])]
            ax_l.plot(d.mu, d[f"len_{name}"], linestyle=ls, marker=mk, color=color, label=label)
        unit = data.length_unit.split(" (")[0]
        ax_l.set(
            title="(b) mean length by pass rate",
            xlabel="pass rate μ",
            ylabel=f"mean length, {unit}",
            xlim=(-0.02, 1.02),
        )
        ax_l.legend(loc="best")
        for method, t in scale.groupby("method", sort=False):
            t = t.sort_values("mu")
            c = style.method_color(method)
            ax_s.plot(
                t.mu, t.S_share_per_prompt, color=c, marker="o", linestyle="none", label=style.method_label(method)
            )
            ax_s.plot(t.mu, t.equal_length_share, color=c, linestyle="--", linewidth=0.9)
            ax_s.plot(t.mu, t.length_corrected_share, color=c, linestyle=":", linewidth=1.1)
            ax_g.plot(t.mu, t.S_share, color=c, marker="o", label=style.method_label(method))
        from matplotlib.lines import Line2D

        h, _ = ax_s.get_legend_handles_labels()
        h += [
            Line2D([], [], color="0.3", linestyle="--", label="equal lengths"),
            Line2D([], [], color="0.3", linestyle=":", label="the dump's lengths"),
        ]
        legend = list(h)  # one legend under the figure, off every panel's data
        ax_s.set(title="(c) S$_\\mu$ per prompt: share over μ", xlabel="pass rate μ", ylabel="share", xlim=(0, 1))
        n_groups = scale.groupby("method").size().max()
        ax_g.axhline(1 / n_groups, color="0.4", linestyle=":", linewidth=0.9)
        ax_g.set(
            title="(d) share of ΣS$_\\mu$ (prompts included)", xlabel="pass rate μ", ylabel="share of ΣS", xlim=(0, 1)
        )
        if readings:
            for i, run in enumerate(readings):
                t = summary[summary.run == run].sort_values("mu")
                ls = style.LINESTYLES[i % len(style.LINESTYLES)]
                mk = style.MARKERS[i % len(style.MARKERS)]
                ax_w.plot(t.mu, t.w_final, color=style.method_color("daro"), linestyle=ls, marker=mk, label=run)
                ax_f.plot(t.mu, t.wS, color=style.method_color("daro"), linestyle=ls, marker=mk, label=run)
            ax_w.axhline(1.0, color="0.4", linewidth=0.6)
            ax_f.axhline(1.0, color="0.4", linestyle=":", linewidth=0.9)
            style.log_axis(ax_w)
            style.log_axis(ax_f)
            ax_w.set(
                title=f"(e) DARO: w$_\\mu$, {sim.config.updates} sim. updates",
                xlabel="pass rate μ",
                ylabel="w$_\\mu$ (log)",
                xlim=(0, 1),
            )
            ax_f.set(
                title="(f) DARO: w·signal/C", xlabel="pass rate μ", ylabel="w·signal/C (1: fixed point)", xlim=(0, 1)
            )
            legend += ax_w.get_legend_handles_labels()[0]
        else:
            for ax in (ax_w, ax_f):
                style.empty_panel(ax, "no DARO simulation\n(simulate=False)")
        legend += [Line2D([], [], color=colors[k], linewidth=4, label=f"(a) k={k}") for k in range(K + 1)]
        fig.legend(
            handles=legend,
            loc="outside lower center",
            ncol=min(len(legend), 6),
            fontsize=6,
            title="methods (c, d), line styles (c), DARO readings (e, f), right answers k of K (a)",
        )
        fig.suptitle(
            f"{data.source} ({data.fmt}): {len(data.groups)} prompt groups of K={K} over "
            f"{len(data.steps)} step(s); lengths in {data.length_unit}",
            fontsize=7.5,
        )
    tables = {
        "rollout_scale": scale,
        "rollout_scale_steps": analysis.scale_steps,
        "rollout_mu_hist": hist,
        "rollout_lengths": lens,
        "rollout_groups": data.groups,
    }
    if sim is not None:
        tables["rollout_daro"] = summary[summary.run.isin(readings)].dropna(axis=1, how="all")
        cfg = dataclasses.asdict(sim.config)
        tables["rollout_sim_config"] = pd.DataFrame(
            [{k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in cfg.items()}]
        )
    res = FigureResult(
        NAME,
        fig,
        tables,
        caption=_caption(analysis, summary, readings),
        notes=list(analysis.notes),
        summary={"K": K, "steps": len(data.steps), "groups": len(data.groups)},
    )
    res = finish_figure(res, out_dir)
    if sim is not None and out_dir is not None:
        from analyses.simulate import plot_simulation

        sub = plot_simulation(sim, Path(out_dir) / "simulate")
        res.paths.update({f"simulate:{k}": v for k, v in sub.paths.items()})
    return res


def _caption(analysis, summary, readings) -> str:
    data, K = analysis.data, analysis.data.K
    lens, scale, hist = analysis.lengths, analysis.scale, analysis.mu_hist
    tot = hist.groupby("k").prompts.sum()
    share01 = float((tot.get(0, 0) + tot.get(K, 0)) / tot.sum())
    top = int(tot.idxmax())
    inner = lens[(lens.k > 0) & (lens.k < K)].dropna(subset=["len_correct", "len_incorrect"])
    parts = [
        f"{len(data.groups)} prompt groups of K={K} over {len(data.steps)} step(s), lengths in {data.length_unit}",
        f"{share01:.0%} of the prompts have μ in {{0, 1}} and carry no gradient; the most common pass rate is "
        f"k={top} ({tot[top] / tot.sum():.0%})",
    ]
    if len(inner):
        gap = inner.len_incorrect / inner.len_correct
        parts.append(f"wrong answers are {gap.min():.2f}–{gap.max():.2f} times as long as right ones across 0 < μ < 1")
    for method, t in scale.groupby("method", sort=False):
        dev_eq = float((t.S_share_per_prompt - t.equal_length_share).abs().max())
        dev_lc = float((t.S_share_per_prompt - t.length_corrected_share).abs().max())
        parts.append(
            f"{style.method_label(method)}'s per-prompt S_μ departs from its equal-length shape by up to "
            f"{dev_eq:.3f} and from its length-corrected shape by up to {dev_lc:.3f} (in share)"
        )
    hidden = []  # curves drawn on top of each other
    for panel, col in (("(c)", "S_share_per_prompt"), ("(d)", "S_share")):
        curves = {
            style.method_label(m): t.sort_values("mu")[col].to_numpy() for m, t in scale.groupby("method", sort=False)
        }
        hidden += [f"in {panel} {a} and {b} coincide" for a, b in style.coinciding(curves, 2e-3)]
    if readings:
        for run in readings:
            s = summary[summary.run == run]
            parts.append(
                f"DARO {run}: w from {s.w_final.min():.3g} to {s.w_final.max():.3g}, "
                f"max |w·signal/C − 1| {float((s.wS - 1).abs().max()):.3g}"
            )
        for panel, col in (("(e)", "w_final"), ("(f)", "wS")):
            curves = {r: summary[summary.run == r].sort_values("mu")[col].to_numpy() for r in readings}
            hidden += [f"in {panel} {a} and {b} coincide" for a, b in style.coinciding(curves, 2e-3)]
    if hidden:
        parts.append("curves that hide each other: " + ", ".join(hidden))
    return "Rollout dump " + data.source + ": " + "; ".join(parts) + "."
