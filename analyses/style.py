"""The paper style shared by every figure: seaborn's paper context, one fixed colour per method.

    with paper_style():
        fig, axes = new_figure(1, 2)                       # a matplotlib Figure, no pyplot state
        axes[0].plot(x, y, color=method_color("daro"), label=method_label("daro"))
        paths = save_figure(fig, out_dir, "my-figure")    # PNG + SVG + PDF

Figures are built on `matplotlib.figure.Figure` directly (never pyplot), so that an analysis
leaves no global figure behind and works on any backend, head-less included.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Width of one column / of the full page of a two-column paper, in inches.
COLUMN_WIDTH = 3.4
PAGE_WIDTH = 7.0

# Every figure draws the methods in the registry's order (daro_lab.algorithms.METHODS), labelled by its
# entries, in these colours (seaborn "colorblind").
METHOD_COLORS = {
    "grpo": "#0173B2",
    "dapo": "#DE8F05",
    "dr_grpo": "#029E73",
    "lipo": "#CC78BC",
    "daro": "#D55E00",
    "static": "#949494",
}
# Colours for methods registered by users, picked by a stable hash of the name.
_EXTRA_COLORS = ("#CA9161", "#FBAFE4", "#56B4E9", "#ECE133", "#8C564B", "#17BECF", "#7F7F7F")
# Arms of one method (an ablation) differ in line style and marker, and in colour: up to MAX_SHADES arms get
# shades of the method's colour (`shade`), more get colours of their own from ARM_PALETTE (seaborn
# "colorblind", then the extra colours).
MAX_SHADES = 3
ARM_PALETTE = (
    "#0173B2",
    "#DE8F05",
    "#029E73",
    "#D55E00",
    "#CC78BC",
    "#CA9161",
    "#FBAFE4",
    "#949494",
    "#ECE133",
    "#56B4E9",
    "#8C564B",
    "#17BECF",
)
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")
FORMATS = ("png", "svg", "pdf")
PNG_DPI = 200


def method_color(method: str) -> str:
    """The fixed colour of a method (a stable fallback colour for unknown methods)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[zlib.crc32(method.encode()) % len(_EXTRA_COLORS)]


def shade(color: str, i: int, n: int, spread: float = 0.5) -> str:
    """Shade i of n of `color`: one arm keeps the colour; several go from darker (mixed with black) to lighter
    (mixed with white), `spread` the largest mix, so the arms of one method stay in its family and apart."""
    if n <= 1:
        return color
    t = spread * (2 * i / (n - 1) - 1)  # -spread .. +spread
    rgb = matplotlib.colors.to_rgb(color)
    mixed = [c * (1 + t) if t < 0 else c + (1 - c) * t for c in rgb]
    return matplotlib.colors.to_hex(mixed)


def method_label(method: str) -> str:
    """The display name of a method, from its registry entry: 'dr_grpo' -> 'Dr. GRPO'."""
    from daro_lab.algorithms import METHODS

    return METHODS[method].label if method in METHODS else method


def method_rank(method: str) -> tuple[int, str]:
    """Sort key putting methods in the registry's order, unknown ones after, alphabetically."""
    from daro_lab.algorithms import METHODS

    order = list(METHODS)
    return (order.index(method) if method in order else len(order), method)


def mu_colors(K: int) -> dict[int, tuple]:
    """{k: colour} for the interior pass rates k = 1..K-1, from hard (dark) to easy (light)."""
    cmap = matplotlib.colormaps["viridis"]
    n = max(K - 1, 1)
    return {k: cmap(0.9 * (k - 1) / max(n - 1, 1)) for k in range(1, K)}


def mu_colorbar(fig: Figure, axes, what: str):
    """One colour scale for panels of runs with different K (mu_colors is linear in k for every K): dark the
    hardest group of a panel's own K (mu = 1/K), light its easiest ((K-1)/K). Below the figure, in place of a
    legend per panel, which at K = 16 (15 groups) covers the curves."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 1024)))
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap), ax=axes, location="bottom", shrink=0.5, aspect=40, ticks=[0, 1]
    )
    bar.ax.set_xticklabels(["μ = 1/K (hardest)", "μ = (K−1)/K (easiest)"])
    bar.set_label(f"{what}: pass-rate group, in each panel's own K", fontsize=7)
    return bar


def mu_label(k: int, K: int) -> str:
    return f"μ={k}/{K}"


def _rc() -> dict:
    import seaborn as sns

    rc = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.0))
    rc.update(
        {
            "font.family": "sans-serif",
            "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
            "axes.titlesize": 8.5,
            "axes.labelsize": 8,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 6.5,
            "legend.title_fontsize": 7,
            "legend.frameon": True,
            "legend.framealpha": 0.85,
            "lines.linewidth": 1.3,
            "lines.markersize": 3.5,
            "grid.linewidth": 0.5,
            "axes.linewidth": 0.6,
            "svg.fonttype": "none",  # text stays text in the SVG
            "pdf.fonttype": 42,  # embed TrueType fonts: editable and accepted by publishers
            "savefig.dpi": PNG_DPI,
        }
    )
    return rc


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply the paper style for the duration of the block (the global rcParams are restored)."""
    with matplotlib.rc_context(_rc()):
        yield


def new_figure(
    nrows: int = 1, ncols: int = 1, width: float = PAGE_WIDTH, height: float | None = None, **subplot_kw
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout Figure and a 2-D array of its axes. Call inside `paper_style()`."""
    if height is None:
        height = 2.2 * nrows
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def empty_panel(ax, message: str) -> None:
    """Mark a panel that has no data, saying why, instead of leaving it blank."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=7, color="0.35", wrap=True, transform=ax.transAxes)


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write `fig` as <stem>.png, .svg and .pdf into `out_dir`; {format: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    engine = fig.get_layout_engine()
    try:
        for i, fmt in enumerate(FORMATS):
            path = out / f"{stem}.{fmt}"
            meta = {"Creator": "daro-lab"} if fmt in ("pdf", "svg") else None
            fig.savefig(path, format=fmt, dpi=PNG_DPI, metadata=meta)
            paths[fmt] = path
            if i == 0 and engine is not None:
                fig.set_layout_engine("none")  # the layout is done: the other formats reuse it (faster)
    finally:
        if engine is not None:
            fig.set_layout_engine(engine)
    return paths


def save_table(df: pd.DataFrame, out_dir: str | Path, stem: str) -> Path:
    """Write the table behind a figure as <stem>.csv (full float precision) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.csv"
    df.to_csv(path, index=False, float_format="%.17g")
    return path


def wrap(text: str, width: int = 30) -> str:
    """Long labels (ablation arms carry their label) on lines of at most `width` characters, so that a panel
    title or a legend entry stays inside the figure."""
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def wrap_rows(labels, width: int, panel_height_in: float, fontsize: float = 6) -> list[str]:
    """Labels of the rows of a panel `panel_height_in` inches high, wrapped at `width` characters and cut (with
    '…') to the lines a row has room for, so that neighbouring labels do not run into each other (the legend
    holds the whole label)."""
    import textwrap

    row_pt = panel_height_in * 72 / max(len(labels), 1)
    most = max(1, int(row_pt // (fontsize * 1.3)))
    out = []
    for text in labels:
        lines = textwrap.wrap(str(text), width) or [str(text)]
        if len(lines) > most:
            lines = lines[:most]
            lines[-1] = lines[-1][: width - 1].rstrip() + "…"
        out.append("\n".join(lines))
    return out


def title_chars(fig_width: float, ncols: int) -> int:
    """Characters per line of a panel title (axes.titlesize 8.5 pt) that stay inside a column of a figure
    `fig_width` inches wide with `ncols` columns of panels: about 13 per inch of column."""
    return max(14, int(13 * fig_width / max(ncols, 1)))


def legend_columns(labels, most: int = 6) -> int:
    """Columns of a figure legend: fewer when the labels are long."""
    longest = max((len(str(x)) for x in labels), default=0)
    return max(1, min(len(labels), most if longest <= 24 else 3 if longest <= 40 else 2))


def arm_handles(runs, arms) -> list:
    """Legend entries, one per arm, in its colour, line style and marker (long labels wrapped)."""
    from matplotlib.lines import Line2D

    out = []
    for arm in arms:
        st = runs.arm_style(arm)
        out.append(
            Line2D([], [], color=st["color"], linestyle=st["linestyle"], marker=st["marker"], label=wrap(arm, 40))
        )
    return out


def arm_legend(fig: Figure, runs, arms) -> None:
    """The figure's legend of arms, above its panels (`top_legend`)."""
    top_legend(fig, arm_handles(runs, arms), legend_columns(arms))


def top_legend(fig: Figure, handles: list, ncol: int) -> None:
    """A figure legend above the panels (constrained layout). The figure grows by the legend's height, so that a
    long legend (many entries, wrapped labels) does not squeeze the panels or cover their labels."""
    nrows = -(-len(handles) // ncol)
    # matplotlib fills a legend's columns first: row r holds entries r, r + nrows, ...
    lines = sum(max(h.get_label().count("\n") + 1 for h in handles[r::nrows]) for r in range(nrows))
    points = matplotlib.font_manager.FontProperties(size=matplotlib.rcParams["legend.fontsize"]).get_size_in_points()
    line_in = 1.3 * points / 72  # a text line of the legend, in inches
    fig.set_figheight(fig.get_figheight() + lines * line_in + 0.12)
    fig.legend(handles=handles, loc="outside upper center", ncol=ncol)


def mu_handles(K: int) -> list:
    """Legend entries for the pass-rate groups k = 1..K-1."""
    from matplotlib.lines import Line2D

    colors = mu_colors(K)
    return [Line2D([], [], color=colors[k], marker="o", markersize=3, label=mu_label(k, K)) for k in range(1, K)]


LOG_SUBS = (
    (1.0,),
    (1.0, 3.0),
    (1.0, 2.0, 5.0),
    (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
    (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
)


def log_ticks(lo: float, hi: float, least: int = 4, most: int = 8) -> list[float]:
    """Tick values of a log axis over [lo, hi]: the coarsest 'nice' mantissas (1; 1, 3; 1, 2, 5; ...) that put at
    least `least` ticks inside, thinned to at most `most` (wide ranges keep every n-th decade)."""
    lo, hi = sorted((float(lo), float(hi)))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= 0:
        return []
    lo = max(lo, hi * 1e-12)
    e0, e1 = int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1
    ticks: list[float] = []
    for subs in LOG_SUBS:
        ticks = [
            m * 10.0**e for e in range(e0, e1 + 1) for m in subs if lo * (1 - 1e-9) <= m * 10.0**e <= hi * (1 + 1e-9)
        ]
        if len(ticks) >= least:
            break
    else:  # under a few tenths of a decade: linear 'nice' steps (0.9, 0.95, 1, 1.05)
        from matplotlib.ticker import MaxNLocator

        ticks = [
            t for t in MaxNLocator(most - 2).tick_values(lo, hi) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) and t > 0
        ]
    step = int(np.ceil(len(ticks) / most)) if len(ticks) > most else 1
    return ticks[::step]


def log_axis(ax, axis: str = "y") -> None:
    """Log scale with plain tick labels ('0.5', '2', '30', not '5×10⁻¹') spread across the plotted range, whatever
    it spans (`log_ticks`, computed when the figure is drawn, so limits set later count); minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, Locator, LogLocator, NullFormatter

    class _Nice(Locator):
        def __call__(self):
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin, vmax):
            return log_ticks(vmin, vmax)

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", nonpositive="mask")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(_Nice())
    a.set_major_formatter(FuncFormatter(lambda x, pos=None: f"{x:.3g}"))
    a.set_minor_locator(LogLocator(subs="auto"))
    a.set_minor_formatter(NullFormatter())


def coinciding(curves: dict[str, np.ndarray], tol: float) -> list[tuple[str, str]]:
    """Pairs (a, b) of named curves on the same x whose values differ by at most `tol` everywhere: drawn, one hides
    the other, which a caption must say."""
    names = list(curves)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = np.asarray(curves[a], float), np.asarray(curves[b], float)
            if x.shape == y.shape and x.size and np.nanmax(np.abs(x - y)) <= tol:
                out.append((a, b))
    return out


def arm_curve(
    ax, runs, arm: str, frame, marker: bool = True, lower: float | None = None, upper: float | None = None
) -> None:
    """One arm's mean curve (`frame`: step, mean, ci) in its style, with its 95% band where it has several runs."""
    a = frame.sort_values("step")
    if a.empty:
        return
    st = runs.arm_style(arm)
    ax.plot(
        a.step,
        a["mean"],
        color=st["color"],
        linestyle=st["linestyle"],
        marker=st["marker"] if marker else None,
        markersize=2.5,
    )
    if a.ci.notna().any():
        band(ax, a.step, a["mean"], a.ci, st["color"], lower=lower, upper=upper)


def band(ax, x, mean, half, color, lower: float | None = None, upper: float | None = None) -> None:
    """Shade mean ± half (the CI over seeds), clipped to the quantity's feasible range."""
    lo, hi = np.asarray(mean) - np.asarray(half), np.asarray(mean) + np.asarray(half)
    if lower is not None:
        lo = np.maximum(lo, lower)
    if upper is not None:
        hi = np.minimum(hi, upper)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
