"""Figure `testbed`: each arm's paired difference to the reference in the area under the exact accuracy curve, per
cell of the testbed grid (daro_lab/testbed/grid.py).

One panel per optimiser regime and parameter sharing, each with its own y scale; along x the level mix and whether
the length gap persists (lengths learned or fixed);
per arm the mean paired AUC difference to the reference with its 95% t-interval over the paired seeds. The dotted
band is +-MDD of the arm with the largest one in that cell: a difference inside it could not have been told from
zero at 80% power. Table `testbed_diffs.csv` (the points drawn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analyses import style
from daro_lab.testbed.grid import summarize

NAME = "testbed"
ARM_COLORS = {
    "grpo": "grpo",
    "dapo": "dapo",
    "dr_grpo": "dr_grpo",
    "lipo": "lipo",
    "frozen-1": "static",
    "frozen-mass": "static",
    "daro-mass": "daro",
    "daro-abs": "daro",
}


def plot_testbed(per_run: pd.DataFrame, reference: str, out: str | Path, metric: str = "auc") -> dict[str, Path]:
    """Draw the figure from the per-run rows; {format: path} (png, svg, pdf)."""
    s = summarize(per_run, reference, metric)
    s = s[s.arm != reference].copy()
    s["x"] = s["mix"].map({"uniform": "unif.", "easy-heavy": "easy", "hard-heavy": "hard"}) + "\n" + s["lengths"]
    panels = list(dict.fromkeys(zip(s.regime, s.sharing)))
    arms = list(dict.fromkeys(s.arm))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    with style.paper_style():
        fig, axes = style.new_figure(nrows, ncols, height=2.0 * nrows + 0.9)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (regime, sharing) in zip(axes.flat, panels):
            d = s[(s.regime == regime) & (s.sharing == sharing)]
            xs = list(dict.fromkeys(d.x))
            for j, x in enumerate(xs):
                mdd = d[d.x == x].mdd.max()
                if np.isfinite(mdd):
                    ax.fill_between([j - 0.4, j + 0.4], -mdd, mdd, color="0.85", lw=0, zorder=0)
            for i, arm in enumerate(arms):
                a = d[d.arm == arm].set_index("x").reindex(xs)
                off = (i - (len(arms) - 1) / 2) * 0.7 / max(1, len(arms))
                c = style.shade(style.method_color(ARM_COLORS.get(arm, arm)), i, len(arms), 0.4)
                err = np.vstack([a["diff"] - a.diff_low, a.diff_high - a["diff"]])
                ax.errorbar(
                    np.arange(len(xs)) + off,
                    a["diff"],
                    yerr=np.nan_to_num(err),
                    fmt="o",
                    ms=2.5,
                    lw=0.8,
                    color=c,
                    label=arm,
                )
            ax.axhline(0, color="0.3", lw=0.6)
            ax.grid(axis="x", visible=False)
            ax.set_xticks(range(len(xs)), xs, fontsize=5.5)
            ax.set_title(f"{regime}, sharing {sharing:g}", fontsize=7)
            ax.tick_params(axis="y", labelsize=5.5)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"{metric.upper()} − {reference} (paired, 95% t-CI)", fontsize=6.5)
        h, lab = axes.flat[0].get_legend_handles_labels()
        readings = dict(zip(s.arm, s.reading))
        fig.legend(
            h,
            [f"{x}: {readings[x]}" for x in lab],
            loc="outside lower center",
            ncols=style.legend_columns(lab, 2),
            fontsize=6,
        )
        paths = style.save_figure(fig, out, NAME)
    style.save_table(s.drop(columns="x"), out, "testbed_diffs")
    return paths
