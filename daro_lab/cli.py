"""`daro-lab`: the command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from daro_lab.config import ConfigError, describe, load_config

app = typer.Typer(
    help="daro-lab: train and study GRPO-family losses and DARO, recorded in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
run_app = typer.Typer(help="Run a named experiment grid (ablations).", no_args_is_help=True)
app.add_typer(run_app, name="run")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _not_built(what: str, issue: int) -> None:
    _fail(f"'{what}' is not built yet (planned in issue {issue}); nothing was run.", code=3)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (see experiments/)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key, e.g. --set algo.eps_high=0.28")


@app.command("config")
def config_cmd(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    keys: bool = typer.Option(False, "--keys", help="list every key with its default and help"),
) -> None:
    """Print the resolved config (file + overrides) as JSON, or every key with its help."""
    if keys:
        for key, default, help_ in describe():
            typer.echo(f"{key:40s} {default:20s} {help_}")
        return
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    typer.echo(cfg.to_json())


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    algo: Optional[str] = typer.Option(None, "--algo", help="method: grpo, dapo, dr_grpo, lipo, daro, static"),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id to continue from its checkpoint"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI"),
) -> None:
    """Train one method and record the run in MLflow."""
    overrides = list(set_ or [])
    if algo:
        overrides.append(f"algo.method={algo}")
    try:
        load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
    _not_built("train", 3)


@app.command("eval")
def eval_cmd() -> None:
    """Evaluate a model or a run on benchmarks (avg@k, pass@k)."""
    _not_built("eval", 6)


@run_app.command("ablation")
def ablation(name: str = typer.Argument(..., help="static-weights, k, weight-lr, weight-signal, weight-param, methods")) -> None:
    """Run an ablation grid as a parent MLflow run with one child per arm and seed."""
    _not_built(f"run ablation {name}", 5)


@app.command()
def plot(figure: str = typer.Argument(..., help="loss-scale, length-vs-mu, weights, convergence, hoeffding, grad-norms")) -> None:
    """Draw one of the paper's figures from finished runs."""
    _not_built(f"plot {figure}", 4)


@app.command()
def report() -> None:
    """Write a paper-style HTML/PDF report of an experiment or an ablation."""
    _not_built("report", 4)


@app.command()
def ui() -> None:
    """Start the MLflow UI on 127.0.0.1 against the same store."""
    _not_built("ui", 3)


@app.command()
def demo() -> None:
    """The embedded default: GRPO and DARO on the tiny preset, same seed, then how to look at them."""
    _not_built("demo", 3)


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(app())
