"""End to end: a very small demo, then every figure and the report from its MLflow runs."""

from __future__ import annotations

import re
import xml.dom.minidom

import pytest
from typer.testing import CliRunner

from analyses import FIGURES
from daro_lab.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_demo_then_every_plot_then_report(tmp_path, monkeypatch, small_env, store):
    monkeypatch.chdir(tmp_path)
    # the demo's chain task with two operands: its longest answer (18) fits SMALL's 4-token responses
    sets = [x for kv in [*small_env, "trainer.mini_batch_prompts=1", "task.max_terms=2"] for x in ("--set", kv)]
    res = runner.invoke(app, ["demo", "--steps", "4", "--tracking-uri", store, *sets])
    assert res.exit_code == 0, res.output

    out = tmp_path / "figs"
    for name in FIGURES:
        res = runner.invoke(
            app, ["plot", name, "--experiment", "daro-lab-demo", "--out", str(out), "--tracking-uri", store]
        )
        assert res.exit_code == 0, f"{name}: {res.output}"
    pngs, svgs, pdfs = (sorted(out.rglob(f"*.{ext}")) for ext in ("png", "svg", "pdf"))
    assert len(pngs) >= len(FIGURES) and len(svgs) >= len(FIGURES) and len(pdfs) >= len(FIGURES)
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    for p in pdfs:
        assert p.read_bytes()[:5] == b"%PDF-", p
    for p in svgs:
        xml.dom.minidom.parse(str(p))  # well-formed
    assert list(out.rglob("*.csv")), "no table saved beside the figures"

    rep = tmp_path / "report"
    res = runner.invoke(app, ["report", "--experiment", "daro-lab-demo", "--out", str(rep), "--tracking-uri", store])
    assert res.exit_code == 0, res.output
    html = (rep / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    assert (rep / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert not re.search(r"""(src|href)=["']https?://""", html), "the report must not need the network"
    assert len(re.findall(r"""src=["']data:image/png;base64,""", html)) >= len(FIGURES)
    for name in FIGURES:
        assert name in html, f"figure {name} not referenced in the report"
    for method in ("grpo", "daro"):
        assert method in html


def test_plot_and_report_name_what_is_missing(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["plot", "loss-scale", "--experiment", "nope", "--tracking-uri", store])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["report", "--experiment", "nope", "--tracking-uri", store])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["plot", "no-such-figure", "--tracking-uri", store])
    assert res.exit_code == 2 and "no-such-figure" in res.output
