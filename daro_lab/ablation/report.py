"""The paper-style report of an ablation: the analyses' report of its finished child runs, with the
ablation's statistical summary as its first section.

    from daro_lab.ablation.report import write_ablation_report
    rep, res = write_ablation_report("sqlite:///mlflow.db", PARENT_RUN_ID)   # -> reports/ablation-<name>-<id8>/

This is the one function `daro-lab report --ablation RUN_ID` needs. It calls into `analyses` only
through `analyses.report.write_report(uri=..., run_ids=..., out_dir=..., figures=...)`; the summary
is recomputed from the store (daro_lab.ablation.summarize_ablation) and saved beside the report as
ablation_summary.md / .csv and ablation_per_seed.csv (and, when the endpoint is one level's accuracy, the same
over all held-out prompts as ablation_summary_all_levels.md / .csv, ablation_per_seed_all_levels.csv).
"""

from __future__ import annotations

import html
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from daro_lab.ablation.collect import AblationResult, summarize_ablation
from daro_lab.ablation.grid import AblationError
from daro_lab.ablation.summary import acc_mode, display_table, verdict


def summary_html(res: AblationResult) -> str:
    """The summary as HTML: the ablation's description, table, verdicts and the markdown's reading notes."""
    disp = display_table(res.summary, bold="")
    table = disp.to_html(index=False, escape=True, classes="results", border=0)
    verdicts = "".join(
        f"<li><code>{html.escape(str(r.arm))}</code>: {html.escape(verdict(r))}</li>" for _, r in res.summary.iterrows()
    )
    notes_html = "".join(f"<li>{html.escape(line)}</li>" for line in _notes(res))
    p = res.plan
    head = (
        f"<p>Ablation <b>{html.escape(p.name)}</b>: parent run <code>{html.escape(res.parent_run_id)}</code>, "
        f"preset {html.escape(p.preset)}, seeds {html.escape(str(p.seeds))}, reference arm "
        f"<code>{html.escape(p.reference)}</code>.</p>"
    )
    if p.description:
        head += f"<p>{html.escape(p.description)}</p>"
    return f"{head}\n{table}\n<h3>Verdicts</h3><ul>{verdicts}</ul><h3>How to read it</h3><ul>{notes_html}</ul>"


def _notes(res: AblationResult) -> list[str]:
    """The markdown's 'How to read it' bullets."""
    lines = res.markdown.split("How to read it:", 1)[-1].strip().splitlines()
    return [line.lstrip("- ").strip() for line in lines if line.strip().startswith("- ")]


def summary_preface(res: AblationResult):
    """The summary as the report's first section: HTML, and a table page plus verdicts in the PDF."""
    from analyses.report import Preface

    compact = display_table(res.summary, bold="").drop(columns=["method"])
    compact["arm"] = [f"{a} (ref)" if ref else a for a, ref in zip(res.summary.arm, res.summary.reference)]
    p = res.plan
    note = (
        f"Parent run {res.parent_run_id}, preset {p.preset}, seeds {p.seeds}, reference arm '{p.reference}'. "
        + " ".join((p.description or "").split())
    )
    lines = [
        "## Arms",
        *(f"• {r.arm}: {r.label}" for _, r in res.summary.iterrows() if r.label),
        "## Verdicts",
        *(f"• {r.arm}: {verdict(r)}" for _, r in res.summary.iterrows()),
        "## How to read it",
        *(f"• {line}" for line in _notes(res)),
    ]
    return Preface("ablation", "Ablation summary", summary_html(res), compact, note, lines)


def write_ablation_report(
    uri: str | None,
    parent_run_id: str,
    out_dir: str | Path | None = None,
    figures: list[str] | None = None,
    against: list[str] | None = None,
) -> tuple[Any, AblationResult]:
    """Write the report of the ablation `parent_run_id` into `out_dir` (default
    reports/ablation-<name>-<first 8 of the id>); return (analyses' ReportResult, the summary). `against`: arms every
    arm is also paired against, beside the plan's reference (ablation_summary_vs_<arm>.md / .csv; with a one-level
    endpoint also over all levels).

    The summary files are written first, so they exist even when the analyses cannot draw a
    report (AnalysisError, e.g. no child finished), which is then re-raised."""
    res = summarize_ablation(uri, parent_run_id)
    arms = [a.name for a in res.plan.arms]
    for ref in against or []:  # before anything is written
        if ref not in arms:
            raise AblationError(
                f"--against: no arm named {ref!r} in ablation '{res.plan.name}' (arms: {', '.join(arms)})"
            )
    out = Path(out_dir) if out_dir else Path("reports") / f"ablation-{res.plan.name}-{parent_run_id[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_summary.md").write_text(res.markdown)
    res.summary.to_csv(out / "ablation_summary.csv", index=False)
    res.per_seed.to_csv(out / "ablation_per_seed.csv", index=False)
    mode = acc_mode(res.plan.accuracy)
    if mode != res.plan.accuracy:  # one level's accuracy is the endpoint: all held-out prompts' beside it
        every = summarize_ablation(uri, parent_run_id, res.plan, accuracy=mode)
        (out / "ablation_summary_all_levels.md").write_text(every.markdown)
        every.summary.to_csv(out / "ablation_summary_all_levels.csv", index=False)
        every.per_seed.to_csv(out / "ablation_per_seed_all_levels.csv", index=False)
    for ref in against or []:
        for acc, suffix in ((res.plan.accuracy, ""), *(((mode, "_all_levels"),) if mode != res.plan.accuracy else ())):
            vs = summarize_ablation(uri, parent_run_id, replace(res.plan, reference=ref), accuracy=acc)
            (out / f"ablation_summary_vs_{ref}{suffix}.md").write_text(vs.markdown)
            vs.summary.to_csv(out / f"ablation_summary_vs_{ref}{suffix}.csv", index=False)
    from analyses.report import write_report

    finished = res.per_seed.loc[res.per_seed.status == "FINISHED", "run_id"].tolist()
    target = res.summary.attrs.get("target_acc")
    # the convergence figure's steps to target: the summary's endpoint (one level's, drawn in its panel (b)) and target
    conv = {
        "accuracy": res.plan.accuracy,
        **({"target": float(target)} if target is not None and math.isfinite(target) else {}),
    }
    rep = write_report(
        uri=res.uri,
        run_ids=finished or [parent_run_id],
        out_dir=out,
        figures=figures,
        title=f"daro-lab ablation '{res.plan.name}' (parent run {parent_run_id[:8]})",
        preface=summary_preface(res),
        figure_options={"convergence": conv},
    )
    return rep, res
