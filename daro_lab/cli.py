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


def _run_training(cfg, resume=None, tracking_uri=None) -> str:
    """Train with clean error reporting: bad input -> exit 2 naming it; a crash -> run FAILED, exit 1."""
    from daro_lab.tracking import TrackingError
    from daro_lab.trainer import train as train_run

    try:
        return train_run(cfg, resume=resume, tracking_uri=tracking_uri)
    except (ConfigError, FileNotFoundError, TrackingError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted: checkpoint saved and the run marked KILLED; continue it with --resume RUN_ID", code=130)
    except Exception as e:  # noqa: BLE001 - the run is already marked FAILED with its traceback
        _fail(f"training failed ({type(e).__name__}: {e}); the MLflow run is marked FAILED with traceback.txt", code=1)
    raise AssertionError("unreachable")


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    algo: Optional[str] = typer.Option(None, "--algo", help="method: grpo, dapo, dr_grpo, lipo, daro, static"),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id to continue from its last checkpoint"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"),
) -> None:
    """Train one method and record the run in MLflow."""
    _quiet()
    cfg = None
    if resume is None:
        overrides = list(set_ or [])
        if algo:
            overrides.append(f"algo.method={algo}")
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            _fail(str(e))
    elif config or algo or set_:
        _fail("--resume continues a run with the config it logged; drop --config/--algo/--set")
    run_id = _run_training(cfg, resume=resume, tracking_uri=tracking_uri)
    typer.echo(f"run {run_id} finished")


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
def ui(
    port: int = typer.Option(5000, "--port", help="port on 127.0.0.1"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"),
) -> None:
    """Start the MLflow UI on 127.0.0.1 against the same store."""
    import subprocess

    from daro_lab.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)")
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0)


@app.command()
def demo(
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps per method (default: the preset's)"),
    seed: int = typer.Option(0, "--seed", help="one seed for both runs"),
    set_: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"),
) -> None:
    """The embedded default: GRPO and DARO on the tiny preset, same seed, recorded in MLflow."""
    from daro_lab.tracking import read_metrics, resolve_tracking_uri

    _quiet()
    uri = resolve_tracking_uri(tracking_uri)
    demo_cfg = Path(__file__).resolve().parent / "presets" / "demo.toml"
    results = []
    for method in ("grpo", "daro"):
        overrides = [f"algo.method={method}", f"seed={seed}", *(set_ or [])]
        if steps is not None:
            overrides.append(f"trainer.steps={steps}")
        try:
            cfg = load_config(demo_cfg, overrides)
        except ConfigError as e:
            _fail(str(e))
        run_id = _run_training(cfg, tracking_uri=uri)
        m = read_metrics(uri, run_id)
        acc = m[m.key == "eval/greedy_acc"].sort_values("step")
        results.append((method, run_id, acc.value.iloc[0], acc.value.iloc[-1]))
    typer.echo(f"\nexperiment '{cfg.tracking.experiment}' in {uri}")
    typer.echo(f"{'method':8s} {'run id':34s} {'greedy acc at start':>20s} {'at end':>8s}")
    for method, run_id, a0, a1 in results:
        typer.echo(f"{method:8s} {run_id:34s} {a0:20.3f} {a1:8.3f}")
    typer.echo("\nOpen them side by side: daro-lab ui" + (f" --tracking-uri {uri}" if tracking_uri else ""))


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(app())
if __name__ == "__main__":
    main()
