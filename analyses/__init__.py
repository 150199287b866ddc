"""Analyses: one module per figure or check, each a function from MLflow runs to a figure and its table.

    from analyses import plot, select_runs
    runs = select_runs("sqlite:///mlflow.db", experiment="daro-lab-demo")
    result = plot("loss-scale", runs, out_dir="reports/daro-lab-demo/figures")
    result.figure, result.table, result.paths, result.caption

Figures (FIGURES): loss-scale, length-vs-mu, weights, convergence, hoeffding, grad-norms, grad-share (how the
gradient is shared between groups, and clipping), levels (accuracy by difficulty level), mu-hist (pass rates over
training). The
report (`analyses.report.write_report`) draws them all into a self-contained HTML file and a PDF.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from analyses.runs import AnalysisError, FigureResult, RunSet, select_runs

# figure name -> (module, function); each function is f(runs, out_dir, **options) -> FigureResult
FIGURES: dict[str, tuple[str, str]] = {
    "loss-scale": ("analyses.loss_scale", "plot_loss_scale"),
    "length-vs-mu": ("analyses.length_vs_mu", "plot_length_vs_mu"),
    "weights": ("analyses.weights", "plot_weights"),
    "convergence": ("analyses.convergence", "plot_convergence"),
    "hoeffding": ("analyses.hoeffding", "plot_hoeffding"),
    "grad-norms": ("analyses.grad_norms", "plot_grad_norms"),
    "grad-share": ("analyses.grad_share", "plot_grad_share"),
    "levels": ("analyses.levels", "plot_levels"),
    "mu-hist": ("analyses.mu_hist", "plot_mu_hist"),
}


def figure_function(name: str):
    """The plotting function of figure `name`; AnalysisError naming the known figures otherwise."""
    if name not in FIGURES:
        raise AnalysisError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    module, fn = FIGURES[name]
    return getattr(importlib.import_module(module), fn)


def plot(name: str, runs: RunSet, out_dir: str | Path | None = None, **options: Any) -> FigureResult:
    """Draw figure `name` from `runs`, saving it and its tables into `out_dir` (if given)."""
    return figure_function(name)(runs, out_dir, **options)


__all__ = ["FIGURES", "AnalysisError", "FigureResult", "RunSet", "figure_function", "plot", "select_runs"]
