"""The paper-style report of an experiment (or of a list of runs, or an ablation's parent run).

    from analyses.report import write_report
    rep = write_report(uri="sqlite:///mlflow.db", experiment="daro-lab-demo", out_dir="reports/daro-lab-demo")
    rep.html, rep.pdf, rep.missing, rep.results

Writes into `out_dir`:
- `report.html`: self-contained (figures embedded as base64 PNG, screen-sized, CSS inline; no network needed),
  from the template `reports/template.html`;
- `report.pdf`: the same content as pages made with matplotlib (text pages, the results table, one
  page per figure with its caption);
- `figures/`: every figure as PNG, SVG and PDF with its tables as CSV; `results.csv`, `runs.csv`,
  `config.csv`.

Contents: the setup (config table, models, data, seeds, versions), the results table (start, final
and best held-out accuracy per arm, overall and by difficulty level, mean ± 95% t-interval over
seeds), every figure with a caption generated from its numbers, the Hoeffding verdict, and a
section that names everything the runs lack (one method, no DARO run, one seed, a figure that could
not be drawn and why). A report on incomplete runs still renders.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import importlib.metadata
import json
import platform
import re
import string
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analyses import FIGURES, figure_function, style
from analyses.runs import AnalysisError, FigureResult, RunSet, as_runset, fmt_ci, mean_ci
from daro_lab.algorithms import METHODS
from daro_lab.record import EVAL_GREEDY, EVAL_SAMPLED

ACC, SAMPLED = EVAL_GREEDY, EVAL_SAMPLED
PAPER_METHODS = tuple(m for m, spec in METHODS.items() if spec.weights != "frozen")  # the registry's, less 'static'
TEMPLATE = Path(__file__).resolve().parent.parent / "reports" / "template.html"
_FALLBACK_TEMPLATE = (
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>$title</title></head>"
    "<body><h1>$title</h1><p>$subtitle</p><ol>$toc</ol>$body<footer>$generated</footer></body></html>"
)
FIGURE_TITLES = {
    "loss-scale": "The loss scale issue: what each pass-rate group receives",
    "length-vs-mu": "Response length against the pass rate",
    "weights": "DARO's weights and the balance w·|L|",
    "convergence": "Convergence",
    "hoeffding": "The Hoeffding check",
    "grad-norms": "Gradient norms",
}
# params shown in the setup's summary lines
_MODEL_KEYS = (
    "model.path",
    "model.arch",
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.dtype",
    "model.warmstart_steps",
)
_DATA_KEYS = (
    "task.name",
    "task.min_digits",
    "task.max_digits",
    "task.ops",
    "task.num_train",
    "task.num_eval",
    "task.data_seed",
)


@dataclass
class Preface:
    """A first section a caller puts before the generic report (an ablation's statistical summary)."""

    anchor: str  # its id in report.html
    title: str  # its heading
    html: str  # its body in report.html
    table: pd.DataFrame | None = None  # report.pdf: a table on a page of its own, after the heading
    note: str = ""  # report.pdf: the text above that table
    lines: list[str] = field(default_factory=list)  # report.pdf: paragraphs after the table


@dataclass
class ReportResult:
    html: Path
    pdf: Path
    out_dir: Path
    results: pd.DataFrame
    figures: dict[str, FigureResult] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # figure -> why it could not be drawn
    missing: list[str] = field(default_factory=list)
    results_sampled: pd.DataFrame | None = None  # the same for eval/sampled_acc (avg@n), when logged


# --------------------------------------------------------------------------------------------
# Tables


def results_table(runs: RunSet, metric: str = ACC) -> pd.DataFrame:
    """Per arm and difficulty level ('all' and each level): start (step 0), final (last logged
    step) and best (max over steps >= 1) held-out accuracy, mean ± 95% t-interval over seeds.

    Long format: arm, method, level, n_seeds, start_mean, start_ci, final_mean, final_ci, best_mean,
    best_ci, final_steps (';'-joined, one per run), seeds.
    """
    rows = []
    for arm, members in runs.arms().items():
        levels = sorted({int(k.rsplit("_", 1)[1]) for r in members for k in r.keys_with_prefix(f"{metric}/level_")})
        for level in ["all", *levels]:
            key = metric if level == "all" else f"{metric}/level_{level}"
            start, final, best, steps, seeds = [], [], [], [], []
            for r in members:
                s = r.series(key).sort_index()
                if s.empty:
                    continue
                start.append(float(s[0]) if 0 in s.index else np.nan)
                final.append(float(s.iloc[-1]))
                later = s[s.index >= 1]
                best.append(float(later.max()) if len(later) else np.nan)
                steps.append(str(int(s.index[-1])))
                seeds.append("-" if r.seed is None else str(r.seed))
            if not final:
                continue
            row = {"arm": arm, "method": members[0].method, "level": str(level), "n_seeds": len(final)}
            for name, vals in (("start", start), ("final", final), ("best", best)):
                m, ci, _ = mean_ci(vals)
                row[f"{name}_mean"], row[f"{name}_ci"] = m, ci
            row["final_steps"], row["seeds"] = ";".join(steps), ";".join(seeds)
            rows.append(row)
    cols = [
        "arm",
        "method",
        "level",
        "n_seeds",
        "start_mean",
        "start_ci",
        "final_mean",
        "final_ci",
        "best_mean",
        "best_ci",
        "final_steps",
        "seeds",
    ]
    return pd.DataFrame(rows, columns=cols)


def runs_table(runs: RunSet) -> pd.DataFrame:
    rows = []
    for arm, members in runs.arms().items():
        for r in members:
            steps = r.series(ACC).index.max() if r.has_metric(ACC) else None
            rows.append(
                {
                    "arm": arm,
                    "method": r.method,
                    "seed": r.seed,
                    "run_name": r.name,
                    "run_id": r.run_id,
                    "status": r.status,
                    "steps": r.param("trainer.steps"),
                    "last_eval_step": steps,
                    "experiment": r.experiment,
                }
            )
    return pd.DataFrame(rows)


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^/\s,'\"\]\[]+/)*([^/\s,'\"\]\[]+)")
INPUTS_DIR = "inputs"  # beside the report: files an arm needs to rerun (frozen DARO weights)


def portable(text: str) -> str:
    """A value as a report shows it: absolute paths of the machine that ran it cut to '…/<last part>'
    ('sqlite:////tmp/x/mlflow.db' -> 'sqlite:///…/mlflow.db'), so a report carries no local paths; server
    URIs (http://host/...) are kept."""
    text = str(text)
    for prefix in ("sqlite:///", "file://"):  # sqlite:////abs/path, file:///abs/path: the path part
        if text.startswith(prefix):
            return prefix + portable(text[len(prefix) :])
    if re.match(r"^[A-Za-z][\w+.-]*://", text):
        return text
    return _ABS_PATH.sub(lambda m: f"…/{m.group(1)}", text)


def _static_file(value: str) -> bool:
    return bool(value) and value != "ones" and not value.startswith("shape:")


def param_shown(key: str, value: str) -> str:
    """A run's param as the report shows it: frozen-weight files as their copy under inputs/, paths cut."""
    if key == "algo.daro.static" and _static_file(value):
        return f"{INPUTS_DIR}/{Path(value).name}"
    return portable(value)


def write_inputs(runs: RunSet, out: Path) -> list[str]:
    """Copy what an arm needs to rerun into out/inputs/: the frozen DARO weights of `static` runs (from the run's
    tag daro_lab.static_weights, the weights it was given, else the file). Returns notes on what is missing."""
    notes = []
    for r in runs:
        value = r.params.get("algo.daro.static", "")
        if r.method != "static" or not _static_file(value):
            continue
        target = out / INPUTS_DIR / Path(value).name
        target.parent.mkdir(parents=True, exist_ok=True)
        tagged = r.tags.get("daro_lab.static_weights")
        if tagged:
            target.write_text(json.dumps({str(k): v for k, v in json.loads(tagged).items()}, indent=1))
        elif Path(value).is_file():
            target.write_text(Path(value).read_text())
        else:
            notes.append(
                f"run {r.name} ({r.run_id}): its frozen weights {portable(value)} are gone from this machine "
                "and not in its tags; inputs/ lacks them"
            )
    return notes


def config_tables(runs: RunSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(params with one value across all runs: key, value), (params that differ: key + one column per run).
    Values as `param_shown` gives them: no machine-local paths."""
    keys = sorted(set().union(*(r.params for r in runs)))
    common, varying = [], []
    for k in keys:
        vals = [param_shown(k, r.params.get(k, "")) for r in runs]
        if len(set(vals)) == 1:
            common.append({"key": k, "value": vals[0]})
        else:
            varying.append({"key": k, **{f"{r.arm} / seed {r.seed} ({r.run_id[:8]})": v for r, v in zip(runs, vals)}})
    return pd.DataFrame(common, columns=["key", "value"]), pd.DataFrame(varying)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("daro-lab", "torch", "transformers", "mlflow", "numpy", "pandas", "matplotlib", "seaborn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def missing_items(runs: RunSet, figures: dict[str, FigureResult], errors: dict[str, str]) -> list[str]:
    """Plain sentences naming what the selected runs lack for a full report."""
    out = []
    methods = runs.methods()
    if len(methods) == 1:
        out.append(f"Only one method ({style.method_label(methods[0])}): there is no comparison between methods.")
    absent = [m for m in PAPER_METHODS if m not in methods]
    if absent:
        out.append("Methods of the paper with no run here: " + ", ".join(style.method_label(m) for m in absent) + ".")
    if "daro" not in methods:
        out.append("No DARO run: the weights figure and DARO's w·|L| panel cannot be drawn.")
    single = [arm for arm, m in runs.arms().items() if len(m) == 1]
    if single:
        out.append(
            f"One seed only for {', '.join(single)}: no confidence interval (mean ± 95% CI needs at least "
            f"two seeds); differences between arms may be noise."
        )
    out.extend(s[0].upper() + s[1:] + "." if not s.endswith(".") else s for s in runs.skipped)
    for name, msg in errors.items():
        out.append(f"Figure '{name}' could not be drawn: {msg}")
    for name, res in figures.items():
        for n in res.notes:
            out.append(f"Figure '{name}': {n}")
    return out


# --------------------------------------------------------------------------------------------
# HTML


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _html_table(df: pd.DataFrame, cls: str = "", key_col: str | None = None, num_cols: Sequence[str] = ()) -> str:
    head = "".join(f"<th class='num'>{_esc(c)}</th>" if c in num_cols else f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            klass = "key" if c == key_col else ("num" if c in num_cols else "")
            cells.append(f"<td class='{klass}'>{_esc(row[c])}</td>" if klass else f"<td>{_esc(row[c])}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def results_display(results: pd.DataFrame) -> pd.DataFrame:
    """The results table as shown: one row per arm, columns per level (final and best, mean ± CI)."""
    rows = []
    for arm, d in results.groupby("arm", sort=False):
        row = {"method": arm, "seeds": int(d.n_seeds.max())}
        for _, r in d.iterrows():
            lvl = "all" if r.level == "all" else f"level {r.level}"
            if r.level == "all":
                row["start"] = fmt_ci(r.start_mean, r.start_ci)
            row[f"final ({lvl})"] = fmt_ci(r.final_mean, r.final_ci)
            row[f"best ({lvl})"] = fmt_ci(r.best_mean, r.best_ci)
        rows.append(row)
    return pd.DataFrame(rows)


EMBED_WIDTH_PX = 1100  # the HTML page's figures: about its text width on a screen; full resolution is linked


def embedded_png(path: str | Path) -> bytes:
    """The page's copy of a figure PNG: at most EMBED_WIDTH_PX wide, 256-colour palette (flat plot colours survive
    it), so that a report of a dozen figures stays a few MB; the 200-dpi PNG, the PDF and the SVG sit beside it."""
    import io

    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > EMBED_WIDTH_PX:
            im = im.resize((EMBED_WIDTH_PX, round(im.height * EMBED_WIDTH_PX / im.width)), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _figure_html(name: str, res: FigureResult, rel_dir: str) -> str:
    png = base64.b64encode(embedded_png(res.paths["png"])).decode("ascii")
    files = " · ".join(
        f"<a href='{_esc(rel_dir)}/{_esc(Path(p).name)}'>{_esc(Path(p).name)}</a>"
        for k, p in res.paths.items()
        if k in ("png", "pdf", "svg") or k.startswith("csv")
    )
    return (
        f"<figure id='fig-{_esc(name)}'><img src='data:image/png;base64,{png}' alt='figure {_esc(name)}'>"
        f"<figcaption><b>Figure: {_esc(name)}.</b> {_esc(res.caption)}"
        f"<span class='files'>Data and vector files (beside this report): {files}</span></figcaption></figure>"
    )


def _verdict_html(hoef: FigureResult | None, error: str | None) -> str:
    if hoef is None:
        return (
            f"<div class='verdict'><span class='tag inconclusive'>NO VERDICT</span> The Hoeffding check could "
            f"not run: {_esc(error or 'not requested')}</div>"
        )
    s = hoef.summary
    klass = "holds" if s.get("holds") else ("fails" if s.get("fails") else "inconclusive")
    tags = " ".join(
        f"<span class='tag {_esc(v if v in ('holds', 'fails') else 'inconclusive')}'>δ={d:g}: {_esc(v)}</span>"
        for d, v in s.get("verdicts", {}).items()
    )
    return f"<div class='verdict {klass}'>{tags}<p>{_esc(s.get('text', ''))}</p></div>"


def _setup_html(runs: RunSet, common: pd.DataFrame, varying: pd.DataFrame, runs_df: pd.DataFrame) -> str:
    r0 = runs.runs[0]
    model = ", ".join(f"{k.split('.', 1)[1]}={r0.params[k]}" for k in _MODEL_KEYS if r0.params.get(k) not in (None, ""))
    model = f"local model {r0.params['model.path']}" if r0.params.get("model.path") else f"the tiny preset ({model})"
    data = ", ".join(f"{k.split('.', 1)[1]}={r0.params[k]}" for k in _DATA_KEYS if k in r0.params)
    seeds = "; ".join(f"{arm}: {', '.join(str(r.seed) for r in m)}" for arm, m in runs.arms().items())
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    commits = sorted({r.tags.get("mlflow.source.git.commit") for r in runs} - {None})
    parts = [
        f"<p><b>Runs:</b> {len(runs)} from {_esc(runs.source)} in <code>{_esc(portable(runs.uri))}</code>.</p>",
        f"<p><b>Model:</b> {_esc(model)}.<br><b>Data:</b> {_esc(data)}.<br><b>Seeds:</b> {_esc(seeds)}.<br>"
        f"<b>Versions (of this report's environment):</b> {_esc(vers)}."
        + (f"<br><b>Code commit of the runs:</b> {_esc(', '.join(commits))}." if commits else "")
        + "</p>",
        "<h3>Runs</h3>",
        _html_table(runs_df, key_col="run_id"),
    ]
    if len(varying):
        parts += ["<h3>Config keys that differ between runs</h3>", _html_table(varying, key_col="key")]
    parts += ["<h3>Config shared by every run</h3>", _html_table(common, key_col="key")]
    return "\n".join(parts)


def render_html(
    runs: RunSet,
    results: pd.DataFrame,
    figures: dict[str, FigureResult],
    errors: dict[str, str],
    missing: list[str],
    fig_dir: Path,
    out_dir: Path,
    template: Path | None = None,
    title: str | None = None,
    preface: Preface | None = None,
    results_sampled: pd.DataFrame | None = None,
) -> str:
    tpl_path = Path(template) if template else TEMPLATE
    tpl = string.Template(tpl_path.read_text(encoding="utf-8") if tpl_path.is_file() else _FALLBACK_TEMPLATE)
    common, varying = config_tables(runs)
    sections = [(preface.anchor, preface.title, preface.html)] if preface else []
    miss = (
        (
            "<div class='missing'><p><b>What these runs lack.</b></p><ul>"
            + "".join(f"<li>{_esc(m)}</li>" for m in missing)
            + "</ul></div>"
        )
        if missing
        else "<p class='note'>Nothing is missing: every method of the paper, several seeds, every figure.</p>"
    )
    sections.append(("missing", "What is missing", miss))
    sections.append(("setup", "Setup", _setup_html(runs, common, varying, runs_table(runs))))
    disp = results_display(results) if len(results) else pd.DataFrame()
    res_html = (
        _html_table(disp, cls="results", num_cols=[c for c in disp.columns if c not in ("method",)])
        if len(disp)
        else "<p>No held-out accuracy was logged.</p>"
    )
    if results_sampled is not None and len(results_sampled):
        sd = results_display(results_sampled)
        res_html += (
            "<p>Sampled held-out accuracy (avg@n: the mean reward of trainer.eval_samples responses per "
            "prompt at the rollout temperature, what training optimises), the same layout:</p>"
            + _html_table(sd, cls="results", num_cols=[c for c in sd.columns if c not in ("method",)])
        )
    sections.append(
        (
            "results",
            "Results",
            (
                "<p>Held-out accuracy (greedy decoding) per arm: at the start (step 0), at the last evaluation, and the best "
                "over the evaluations after the start; overall and by difficulty level. Mean ± half-width of the 95% "
                "t-interval over seeds (no ± with a single seed).</p>" + res_html
            ),
        )
    )
    rel = _relpath(fig_dir, out_dir)
    for name in FIGURES:
        if name in figures:
            body = _figure_html(name, figures[name], rel)
        else:
            body = f"<div class='missing'>Not drawn: {_esc(errors.get(name, 'not requested'))}</div>"
        sections.append((f"sec-{name}", FIGURE_TITLES.get(name, name), body))
    sections.append(("verdict", "Hoeffding verdict", _verdict_html(figures.get("hoeffding"), errors.get("hoeffding"))))
    body = "\n".join(f"<section id='{sid}'><h2>{_esc(t)}</h2>\n{b}\n</section>" for sid, t, b in sections)
    toc = "".join(f"<li><a href='#{sid}'>{_esc(t)}</a></li>" for sid, t, _ in sections)
    title = title or f"daro-lab report: {runs.title()}"
    subtitle = (
        f"{len(runs)} runs, methods {', '.join(style.method_label(m) for m in runs.methods())}; "
        f"loss scale issue and DARO (arXiv 2510.09001)"
    )
    generated = (
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by daro-lab "
        f"{versions().get('daro-lab', '')} from {_esc(portable(runs.uri))}."
    )
    return tpl.safe_substitute(title=_esc(title), subtitle=_esc(subtitle), toc=toc, body=body, generated=generated)


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve()).replace(os.sep, "/")


# --------------------------------------------------------------------------------------------
# PDF


def _text_pages(pdf, title: str, paragraphs: list[str], width_chars: int = 105, lines_per_page: int = 62) -> None:
    from matplotlib.figure import Figure

    lines: list[tuple[str, bool]] = [(title, True), ("", False)]
    for p in paragraphs:
        if p.startswith("## "):
            lines += [("", False), (p[3:], True)]
            continue
        bullet = p.startswith("• ")
        for ln in textwrap.wrap(p, width_chars, subsequent_indent="   " if bullet else "") or [""]:
            lines.append((ln, False))
        if not bullet:
            lines.append(("", False))
    for start in range(0, len(lines), lines_per_page):
        fig = Figure(figsize=(8.27, 11.69))
        y = 0.95
        for text, bold in lines[start : start + lines_per_page]:
            fig.text(
                0.07,
                y,
                text,
                fontsize=10.5 if bold else 8.2,
                fontweight="bold" if bold else "normal",
                family="DejaVu Sans",
                va="top",
            )
            y -= 0.0142
        pdf.savefig(fig)


def _table_page(pdf, title: str, df: pd.DataFrame, note: str) -> None:
    from matplotlib.figure import Figure

    wide = len(df.columns) > 6
    fig = Figure(figsize=(11.69, 8.27) if wide else (8.27, 11.69))
    fig.text(0.05, 0.95, title, fontsize=12, fontweight="bold", va="top")
    below = 0.91 - 0.03 * title.count("\n")  # a two-line title pushes the note down
    fig.text(0.05, below, "\n".join(textwrap.wrap(note, 150 if wide else 105)), fontsize=8, va="top")
    if len(df):
        ax = fig.add_axes([0.03, 0.1, 0.94, 0.72 - (0.91 - below)])
        ax.axis("off")
        width = 16 if wide else 14
        cols = ["\n".join(textwrap.wrap(str(c), width)) for c in df.columns]
        # cells wrap too (a long one ran into its neighbour), and rows get the height of their longest cell
        cells = [["\n".join(textwrap.wrap(str(v), width)) or "" for v in row] for row in df.astype(str).values]
        lines = max([1] + [c.count("\n") + 1 for row in cells for c in row])
        tab = ax.table(cellText=cells, colLabels=cols, loc="upper center", cellLoc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(6.5 if wide else 7.5)
        tab.scale(1, 1.0 + 0.9 * lines)
    pdf.savefig(fig)


def _figure_page(pdf, name: str, res: FigureResult) -> None:
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    img = mpimg.imread(res.paths["png"])
    h, w = img.shape[:2]
    fig = Figure(figsize=(8.27, 11.69))
    fig.text(0.06, 0.965, FIGURE_TITLES.get(name, name), fontsize=12, fontweight="bold", va="top")
    cap = textwrap.wrap(res.caption, 110)
    img_h = min(0.62, 0.88 * (h / w) * (8.27 / 11.69))
    ax = fig.add_axes([0.06, 0.93 - img_h, 0.88, img_h])
    ax.imshow(img, interpolation="none")  # embedded as is, at its own resolution
    ax.axis("off")
    y = 0.92 - img_h - 0.02
    for ln in cap:
        fig.text(0.06, y, ln, fontsize=7.6, va="top")
        y -= 0.0135
        if y < 0.03:
            break
    pdf.savefig(fig)


def render_pdf(
    path: Path,
    runs: RunSet,
    results: pd.DataFrame,
    figures: dict[str, FigureResult],
    errors: dict[str, str],
    missing: list[str],
    title: str | None = None,
    preface: Preface | None = None,
    results_sampled: pd.DataFrame | None = None,
) -> None:
    from matplotlib.backends.backend_pdf import PdfPages

    common, varying = config_tables(runs)
    r0 = runs.runs[0]
    setup = [
        f"Runs: {len(runs)} from {runs.source} in {portable(runs.uri)}.",
        "Model: "
        + (
            r0.params.get("model.path")
            or "tiny preset, "
            + ", ".join(f"{k.split('.', 1)[1]}={r0.params[k]}" for k in _MODEL_KEYS[1:] if k in r0.params)
        )
        + ".",
        "Data: " + ", ".join(f"{k.split('.', 1)[1]}={r0.params[k]}" for k in _DATA_KEYS if k in r0.params) + ".",
        "Seeds: " + "; ".join(f"{arm}: {', '.join(str(r.seed) for r in m)}" for arm, m in runs.arms().items()) + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
        "## Runs",
        *[f"• {r.arm}, seed {r.seed}: run {r.name} ({r.run_id}), {r.status}" for r in runs],
    ]
    if len(varying):
        setup.append("## Config keys that differ between runs")
        setup += [
            f"• {row['key']}: " + ", ".join(f"{c}={row[c]}" for c in varying.columns[1:])
            for _, row in varying.iterrows()
        ]
    setup.append("## Config shared by every run")
    setup += [f"• {row.key} = {row.value}" for row in common.itertuples()]
    title = title or f"daro-lab report: {runs.title()}"
    with PdfPages(path, metadata={"Title": title, "Creator": "daro-lab"}) as pdf:
        if preface is not None:
            _table_page(
                pdf,
                f"{title}\n{preface.title}",
                preface.table if preface.table is not None else pd.DataFrame(),
                preface.note,
            )
            if preface.lines:
                _text_pages(pdf, preface.title, preface.lines)
        _text_pages(
            pdf,
            title if preface is None else "Setup and runs",
            ["## What is missing", *(f"• {m}" for m in missing or ["Nothing is missing."]), "## Setup", *setup],
        )
        _table_page(
            pdf,
            "Results: held-out accuracy (greedy)",
            results_display(results) if len(results) else results,
            "Start (step 0), final (last evaluation) and best (over evaluations after the start) held-out "
            "accuracy per arm, overall and by difficulty level; mean ± half-width of the 95% t-interval "
            "over seeds (no ± with a single seed).",
        )
        if results_sampled is not None and len(results_sampled):
            _table_page(
                pdf,
                "Results: held-out accuracy (sampled, avg@n)",
                results_display(results_sampled),
                "The same for the mean reward of trainer.eval_samples responses per prompt at the rollout "
                "temperature (what training optimises).",
            )
        for name in FIGURES:
            if name in figures:
                _figure_page(pdf, name, figures[name])
        hoef = figures.get("hoeffding")
        _text_pages(
            pdf,
            "Hoeffding verdict",
            [hoef.summary["text"] if hoef else f"No verdict: {errors.get('hoeffding', 'not requested')}"]
            + [f"• Figure '{n}' not drawn: {e}" for n, e in errors.items()],
        )


# --------------------------------------------------------------------------------------------


def write_report(
    runs: RunSet | None = None,
    out_dir: str | Path | None = None,
    *,
    uri: str | None = None,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    figures: Sequence[str] | None = None,
    template: str | Path | None = None,
    title: str | None = None,
    preface: Preface | None = None,
    figure_options: dict[str, dict] | None = None,
) -> ReportResult:
    """Draw every figure (or `figures`) and write report.html and report.pdf into `out_dir`
    (default: reports/<experiment> under the current directory). `title` replaces the default
    'daro-lab report: <runs>'; `preface` is a first section (e.g. an ablation's summary); `figure_options`: keyword
    arguments per figure (e.g. {"convergence": {"target": 0.6}}, the ablation summary's target).

    Raises AnalysisError only when no run can be selected or none has per-mu data; a figure that
    cannot be drawn is reported in the document instead."""
    runs = as_runset(runs, uri, experiment, run_ids)
    have, _ = runs.with_table("per_mu")
    if not have:
        raise AnalysisError(
            f"report: none of the selected runs ({runs.source}) has per-mu data (table 'per_mu'); "
            f"runs: {', '.join(r.run_id for r in runs)}"
        )
    out = Path(out_dir) if out_dir else Path("reports") / runs.slug()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, FigureResult] = {}
    errors: dict[str, str] = {}
    for name in figures or list(FIGURES):
        try:
            done[name] = figure_function(name)(runs, fig_dir, **(figure_options or {}).get(name, {}))
        except AnalysisError as exc:
            errors[name] = str(exc)
    results = results_table(runs)
    style.save_table(results, out, "results")
    sampled = results_table(runs, SAMPLED)
    if len(sampled):
        style.save_table(sampled, out, "results_sampled")
    style.save_table(runs_table(runs), out, "runs")
    common, varying = config_tables(runs)
    style.save_table(common, out, "config")
    if len(varying):
        style.save_table(varying, out, "config_varying")
    missing = missing_items(runs, done, errors) + write_inputs(runs, out)
    html_path = out / "report.html"
    html_path.write_text(
        render_html(runs, results, done, errors, missing, fig_dir, out, template, title, preface, sampled),
        encoding="utf-8",
    )
    pdf_path = out / "report.pdf"
    with style.paper_style():
        render_pdf(pdf_path, runs, results, done, errors, missing, title, preface, sampled)
    return ReportResult(html_path, pdf_path, out, results, done, errors, missing, sampled if len(sampled) else None)
