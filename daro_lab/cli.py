"""`daro-lab`: the command line. Each command is a thin shell over a library function."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from daro_lab.config import ConfigError, describe, load_config
from daro_lab.record import EVAL_ACC

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


def _run_training(cfg, resume=None, tracking_uri=None, force=False) -> str:
    """Train with clean error reporting: bad input -> exit 2 naming it, before any run exists; a crash -> run FAILED,
    exit 1; an interrupt -> run KILLED, exit 128 + the signal's number (Ctrl-C: 130), saying where it resumes."""
    from daro_lab.tracking import TrackingError, out_of_space, out_of_space_message, resolve_tracking_uri
    from daro_lab.trainer import train as train_run

    try:
        return train_run(cfg, resume=resume, tracking_uri=tracking_uri, force=force)
    except (ConfigError, FileNotFoundError, TrackingError) as e:
        end = getattr(e, "daro_lab_run", None)
        _fail(str(e) + (f" (run {end.run_id} is marked FAILED)" if end is not None else ""))
    except KeyboardInterrupt as e:
        _fail(_interrupt_message(e), code=_exit_code(e))
    except Exception as e:  # noqa: BLE001
        end = getattr(e, "daro_lab_run", None)
        if out_of_space(e):  # name the cause, not MLflow's SQLAlchemy text, and the state the run was left in
            _fail(
                out_of_space_message(
                    resolve_tracking_uri(tracking_uri or cfg.tracking.uri or None)
                    if cfg
                    else resolve_tracking_uri(tracking_uri),
                    end.run_id if end else None,
                ),
                code=1,
            )
        if end is not None:
            _fail(
                f"training failed ({type(e).__name__}: {e}); run {end.run_id} is marked FAILED with traceback.txt; "
                f"--resume {end.run_id} continues it from its last checkpoint",
                code=1,
            )
        _fail(
            f"training failed before any MLflow run was created, so nothing was recorded ({type(e).__name__}: {e})",
            code=1,
        )
    raise AssertionError("unreachable")


def _exit_code(e: BaseException) -> int:
    """128 + the signal's number (SIGTERM 143, SIGHUP 129), 130 for Ctrl-C or a KeyboardInterrupt raised by code."""
    from daro_lab.signals import Interrupted

    return 128 + e.signum if isinstance(e, Interrupted) else 130


def _interrupt_message(e: BaseException) -> str:
    """What an interrupt did to the run and its checkpoint (train() sets `daro_lab_run` on the exception)."""
    from daro_lab.signals import signal_name

    end = getattr(e, "daro_lab_run", None)
    what = f"interrupted ({signal_name(e)})"
    if end is None:
        return f"{what} before a run was created; nothing was recorded"
    saved = (
        f"it stopped after step {end.step}, whose checkpoint is saved"
        if end.step is not None
        else "the unfinished step was discarded, not saved"
    )
    where = f"from {end.resume_from}" if end.resume_from else "from the start: it has no checkpoint yet"
    return f"{what}: {saved}; run {end.run_id} is marked KILLED; --resume {end.run_id} continues it {where}"


def _ablation_interrupt_message(e: BaseException) -> str:
    """What an interrupt did to a sweep: the arm running in this process (its run, and whether a step boundary was
    saved: `daro_lab_run`, set by train()), the parent KILLED, how to continue."""
    end = getattr(e, "daro_lab_run", None)
    if end is None:  # parallel workers, or between arms: each worker's run ends KILLED at its last saved step
        arm = "the running arms' runs are KILLED, each resumable from its last saved step"
    else:
        saved = (
            f"it stopped after step {end.step}, whose checkpoint is saved"
            if end.step is not None
            else "its unfinished step was discarded, not saved"
        )
        arm = f"the running arm's run {end.run_id} is KILLED ({saved})"
    return (
        f"interrupted: {arm}; the parent run is KILLED; continue the sweep with --resume PARENT_RUN_ID (printed above)"
    )


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow logs every failed database write with SQLAlchemy's whole traceback before raising it; daro-lab catches
    # what it raises and says what happened (e.g. a full disk, the run's state)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    algo: Optional[str] = typer.Option(
        None,
        "--algo",
        help="method: a name of the registry (daro_lab.algorithms.METHODS: grpo, dapo, dr_grpo, lipo, daro, static, ...)",
    ),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id to continue from its last checkpoint"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="resolve the config, build the architecture on the meta device, print the memory plan; no training, no GPU, no weights",
    ),
    gpus: int = typer.Option(
        1,
        "--gpus",
        min=1,
        help="with --dry-run: plan one GPU of a torchrun job of this many ranks (trainer.parallel says DDP or FSDP)",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="with --resume: take over a run whose lock file was written on another host (only once that process is gone)",
    ),
) -> None:
    """Train one method and record the run in MLflow."""
    _quiet()
    cfg = None
    if resume is not None and not resume.strip():
        _fail("--resume needs the id of the run to continue (got an empty string)")
    if force and resume is None:
        _fail("--force goes with --resume RUN_ID")
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
    if dry_run:
        from daro_lab.trainer.memory import dry_run as plan_run

        if cfg is None:
            _fail("--dry-run needs a config (--config/--set), not --resume")
        try:
            typer.echo(plan_run(cfg, config, gpus=gpus)[1])
        except ConfigError as e:
            _fail(str(e))
        return
    run_id = _run_training(cfg, resume=resume, tracking_uri=tracking_uri, force=force)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line for the job, not one per rank
        typer.echo(f"run {run_id} finished")


@app.command("eval")
def eval_cmd(
    model: Optional[List[str]] = typer.Option(None, "--model", help="local Hugging Face model directory (repeatable)"),
    run: Optional[List[str]] = typer.Option(
        None, "--run", help="MLflow run id of a training run: its final checkpoint (repeatable)"
    ),
    benchmarks: Optional[List[str]] = typer.Option(
        None, "--benchmarks", "-b", help="name=path.jsonl (repeatable; default: eval.benchmarks of the config)"
    ),
    k: Optional[int] = typer.Option(None, "--k", help="samples per problem: avg@k and pass@1..k (default eval.k = 4)"),
    greedy: bool = typer.Option(False, "--greedy", help="one greedy response per problem"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    device: Optional[str] = typer.Option(
        None, "--device", help="torch device (default: cuda when available, else cpu)"
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
) -> None:
    """Evaluate models or runs on benchmarks (avg@k, pass@k), recorded in MLflow in the paper's table layout."""
    from daro_lab.tracking import TrackingError

    _quiet()
    overrides = list(set_ or [])
    if benchmarks:
        overrides.append("eval.benchmarks=[" + ", ".join(_toml_str(b) for b in benchmarks) + "]")
    if k is not None:
        overrides.append(f"eval.k={k}")
    if greedy:
        overrides.append("eval.greedy=true")
    try:
        from daro_lab.eval.run import run_eval

        cfg = load_config(config, overrides)
        run_id, table = run_eval(
            cfg,
            models=model or [],
            runs=run or [],
            tracking_uri=tracking_uri,
            device=device,
            echo=lambda m: typer.echo(m, err=True),
        )
    except (ConfigError, FileNotFoundError, TrackingError) as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        from daro_lab.signals import signal_name

        _fail(f"interrupted ({signal_name(e)}): the eval run (if it had started) is marked KILLED", code=_exit_code(e))
    except Exception as e:  # noqa: BLE001 - run_eval marks its run FAILED with traceback.txt
        _fail(
            f"evaluation failed ({type(e).__name__}: {e}); a started eval run is marked FAILED with traceback.txt",
            code=1,
        )
    typer.echo(table)
    typer.echo(f"eval run {run_id} in experiment '{cfg.eval.experiment}'")


def _toml_str(text: str) -> str:
    """A TOML basic string holding `text` (for building --set values)."""
    import json

    return json.dumps(text)


@run_app.command("ablation")
def ablation(
    name: str = typer.Argument(
        ...,
        help="grid experiments/ablations/NAME.toml: static-weights, k, weight-lr, weight-reg, weight-signal, weight-param, methods (or a grid file)",
    ),
    preset: str = typer.Option(
        "tiny",
        "--preset",
        help="base config: 'tiny' (embedded demo preset, chain task), 'arithmetic' (the tiny model on addition), 'paper' (experiments/paper/qwen2.5-math-1.5b/daro.toml), 'paper/<model>', or a .toml path",
    ),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="seeds per arm (default: the grid's)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps per run (default: the preset's)"),
    executor: str = typer.Option(
        "local",
        "--executor",
        help="'local' (sequential, or a process pool when the cores allow) or 'ray' (one Ray task per arm and seed)",
    ),
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="parent run id of an interrupted ablation: finished arms are kept, the others continue"
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="with --resume: also rerun FAILED arms (from their checkpoint if they have one)"
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="local executor: parallel processes (default: usable cores // the grid's num_cpus)"
    ),
    ray_address: Optional[str] = typer.Option(
        None,
        "--ray-address",
        help="ray executor: cluster address ('auto' joins a running one; default starts a local instance)",
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
    init_seed: Optional[str] = typer.Option(
        None,
        "--init-seed",
        help="'shared' (every seed from one warm start: seeds vary RL sampling only) or 'per_seed' (model.init_seed = the seed: the warm start varies too); default: the grid's (shared)",
    ),
    report_: bool = typer.Option(
        True,
        "--report/--no-report",
        help="when the sweep ends, also write the paper-style report (analyses) to reports/ablation-<name>-<id>/",
    ),
) -> None:
    """Run an ablation grid as a parent MLflow run with one child per arm and seed; print its summary."""
    _quiet()
    from daro_lab.ablation import AblationError, run_ablation
    from daro_lab.tracking import TrackingError

    if resume and (set_ or seeds is not None or steps is not None or preset != "tiny" or init_seed is not None):
        _fail(
            "--resume continues the ablation with the plan its parent run logged; drop "
            "--preset/--seeds/--steps/--set/--init-seed"
        )
    from daro_lab.signals import StopSignals

    try:
        with StopSignals(graceful=False):  # between arms too: SIGTERM/SIGHUP mark the parent KILLED, exit 128+N
            res = run_ablation(
                name,
                preset=preset,
                seeds=seeds,
                steps=steps,
                overrides=list(set_ or []),
                executor=executor,
                tracking_uri=tracking_uri,
                resume=resume,
                retry_failed=retry_failed,
                workers=workers,
                ray_address=ray_address,
                progress=True,
                echo=lambda m: typer.echo(m, err=True),
                init_seed=init_seed,
            )
    except (AblationError, ConfigError, TrackingError) as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _fail(_ablation_interrupt_message(e), code=_exit_code(e))
    typer.echo(res.markdown)
    typer.echo(
        f"parent run {res.parent_run_id}: {res.status}; summary artifacts tables/ablation_summary.parquet "
        f"and ablation_summary.md on it"
    )
    if report_:
        try:
            from daro_lab.ablation.report import write_ablation_report

            rep, _ = write_ablation_report(res.uri, res.parent_run_id)
            typer.echo(f"report  {rep.html}")
        except Exception as e:  # noqa: BLE001 - the sweep and its summary are recorded; the report is extra
            typer.secho(
                f"warning: the report could not be written ({type(e).__name__}: {e}); the summary is on the parent run",
                fg=typer.colors.YELLOW,
                err=True,
            )
    if res.status != "FINISHED":
        raise typer.Exit(1)


def _quiet_analysis() -> None:
    """Like _quiet, without importing transformers (the analyses never need it)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _split_ids(values: Optional[List[str]]) -> List[str]:
    """Run ids from repeated and/or comma-separated --runs values."""
    return [v for item in values or [] for v in item.replace(",", " ").split()]


ExperimentOpt = typer.Option(
    None, "--experiment", "-e", help="MLflow experiment: its FINISHED runs (default: the store's only experiment)"
)
RunsOpt = typer.Option(
    None, "--runs", help="run ids, repeated or comma-separated; a parent (ablation) run expands to its children"
)


@app.command()
def plot(
    figure: str = typer.Argument(
        ..., help="loss-scale, length-vs-mu, weights, convergence, hoeffding, grad-norms, grad-share, levels, mu-hist"
    ),
    experiment: Optional[str] = ExperimentOpt,
    runs: Optional[List[str]] = RunsOpt,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="output folder (default: reports/<experiment>/figures)"
    ),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
) -> None:
    """Draw one of the paper's figures from finished runs: PNG, SVG, PDF and the table behind it (CSV)."""
    _quiet_analysis()
    from analyses import FIGURES, AnalysisError, select_runs
    from analyses import plot as plot_figure
    from daro_lab.tracking import TrackingError

    if figure not in FIGURES:
        _fail(f"unknown figure {figure!r}; known: {', '.join(FIGURES)}")
    if out is not None:
        _writable_dir(out)
    try:
        selected = select_runs(tracking_uri, experiment=experiment, run_ids=_split_ids(runs))
        result = plot_figure(figure, selected, out or Path("reports") / selected.slug() / "figures")
    except (AnalysisError, TrackingError) as e:
        _fail(str(e))
    for note in result.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    for kind, path in result.paths.items():
        typer.echo(f"{kind:26s} {path}")
    typer.echo(f"\n{result.caption}")


@app.command()
def report(
    experiment: Optional[str] = ExperimentOpt,
    runs: Optional[List[str]] = RunsOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: reports/<experiment>)"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
    ablation: Optional[str] = typer.Option(
        None, "--ablation", help="parent run id of an ablation: its summary, then every figure"
    ),
    against: Optional[List[str]] = typer.Option(
        None,
        "--against",
        help="with --ablation: also pair every arm against this arm (repeatable; ablation_summary_vs_ARM.md)",
    ),
) -> None:
    """Write a paper-style report (self-contained HTML and a PDF) of an experiment or an ablation."""
    _quiet_analysis()
    if out is not None:
        _writable_dir(out)
    from analyses import AnalysisError, select_runs
    from analyses.report import write_report
    from daro_lab.tracking import TrackingError

    if ablation:
        from daro_lab.ablation import AblationError
        from daro_lab.ablation.report import write_ablation_report

        try:
            rep, _ = write_ablation_report(tracking_uri, ablation, out, against=list(against or []))
        except (AnalysisError, TrackingError, AblationError) as e:
            _fail(str(e))
        typer.echo(f"html    {rep.html}\npdf     {rep.pdf}")
        return
    try:
        selected = select_runs(tracking_uri, experiment=experiment, run_ids=_split_ids(runs))
        rep = write_report(selected, out)
    except (AnalysisError, TrackingError) as e:
        _fail(str(e))
    for item in rep.missing:
        typer.secho(f"missing: {item}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"html    {rep.html}\npdf     {rep.pdf}\nfigures {rep.out_dir / 'figures'} "
        f"({len(rep.figures)} of {len(rep.figures) + len(rep.errors)} drawn)"
    )


def _writable_dir(out: Path, what: str = "--out") -> Path:
    """Check, before any work, that `out` is a folder that can be written or made (nothing is made here); exit 2
    naming it otherwise."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        _fail(f"{what} {out}: {probe} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".daro-lab-write-check-"):
            pass
    except OSError as e:
        _fail(f"{what} {out}: cannot write in {probe} ({e.strerror or e})")
    return out


def _numbers(text: str, what: str) -> float | list[float]:
    """'400' -> 400.0; '10,10,9' -> [10.0, 10.0, 9.0]; exit 2 naming the option otherwise."""
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        _fail(f"{what}: expected a number or comma-separated numbers, got {text!r}")
    if not vals:
        _fail(f"{what}: expected a number or comma-separated numbers, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


@app.command()
def simulate(
    len_correct: str = typer.Option(
        "400",
        "--len-correct",
        help="mean length (tokens) of a right answer: one number, or K-1 comma-separated, one per k = 1..K-1",
    ),
    len_wrong: str = typer.Option(
        "600", "--len-wrong", help="mean length of a wrong answer: one number, or K-1 comma-separated"
    ),
    updates: int = typer.Option(
        600, "--updates", min=1, help="DARO weight updates (the paper: 300 steps x 2 mini-batches = 600)"
    ),
    k: int = typer.Option(8, "--k", min=2, help="responses per prompt K (the paper: 8)"),
    prompts: int = typer.Option(64, "--prompts", min=1, help="prompts per mini-batch (the paper: 64)"),
    lr_w: float = typer.Option(1e-3, "--lr-w", help="learning rate of DARO's weights (the paper: 1e-3)"),
    reading: Optional[List[str]] = typer.Option(
        None,
        "--reading",
        help="DARO reading 'signal[:reg[:ema]]', repeatable (default: abs:1 signed:1 mass:1 abs:auto mass:auto); signal abs, signed, mass or grad",
    ),
    mu_weights: Optional[str] = typer.Option(
        None, "--mu-weights", help="K-1 comma-separated relative frequencies of k = 1..K-1 (default uniform)"
    ),
    len_cv: float = typer.Option(
        0.2, "--len-cv", help="coefficient of variation of a response's length around its mean"
    ),
    ratio_noise: float = typer.Option(
        0.0,
        "--ratio-noise",
        help="std of the per-token log-ratio (0: on-policy, rho = 1; > 0 simulates every token, slower)",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic mini-batches"),
    out: Path = typer.Option(Path("reports/simulate"), "--out", "-o", help="folder for the figure and its tables"),
) -> None:
    """What the loss scale and DARO's weights would be on a run with these lengths: no model, the real loss."""
    _quiet_analysis()
    from analyses.simulate import plot_simulation
    from daro_lab.simulate import DEFAULT_READINGS, Reading, SimConfig
    from daro_lab.simulate import simulate as run_simulation

    cfg = SimConfig(
        len_correct=_numbers(len_correct, "--len-correct"),
        len_wrong=_numbers(len_wrong, "--len-wrong"),
        K=k,
        prompts=prompts,
        updates=updates,
        lr_w=lr_w,
        readings=list(reading or DEFAULT_READINGS),
        mu_weights=None if mu_weights is None else list(map(float, _listify(_numbers(mu_weights, "--mu-weights")))),
        len_cv=len_cv,
        ratio_noise=ratio_noise,
        seed=seed,
    )
    try:  # every value, and the output folder, before the computation
        cfg.check()
        for r in cfg.readings:
            Reading.parse(r)
    except ValueError as e:
        _fail(str(e))
    _writable_dir(out)
    result = run_simulation(cfg, progress=cfg.updates * max(1, len(cfg.readings)) >= 20_000)
    fig = plot_simulation(result, out)
    s = fig.tables["simulate_summary"]
    pd_opts = {"index": False, "float_format": lambda x: f"{x:.3g}"}
    base = s[s.w_final.isna()] if "w_final" in s else s
    typer.echo(
        "Baselines, last tenth of the updates: S share per prompt (measured, equal lengths, given lengths), "
        "|C| share, L\n"
        + base[["run", "k", "S_share", "equal_length_share", "length_corrected_share", "C_abs_share", "L"]].to_string(
            **pd_opts
        )
    )
    if "w_final" in s:
        d = s[s.w_final.notna()]
        typer.echo(
            "\nDARO readings: final w and w*signal/C (1 = the fixed point), mean over the last tenth\n"
            + d[["run", "k", "signal", "reg", "w_final", "wS"]].to_string(**pd_opts)
        )
    for kind, path in fig.paths.items():
        typer.echo(f"{kind:26s} {path}")
    typer.echo(f"\n{fig.caption}")


@app.command()
def testbed(
    arms: str = typer.Option(
        ",".join(("grpo", "dapo", "frozen-1", "frozen-mass", "daro-mass", "daro-abs")),
        "--arms",
        help="comma-separated arms (daro_lab/testbed/loop.py ARMS): grpo, dapo, dr_grpo, lipo, "
        "frozen-1, frozen-mass, daro-mass, daro-abs",
    ),
    reference: str = typer.Option("grpo", "--reference", help="the arm every other is paired against"),
    seeds: int = typer.Option(50, "--seeds", help="paired seeds per arm and cell (seeds 0..N-1)"),
    steps: int = typer.Option(150, "--steps", help="updates per run"),
    sharing: str = typer.Option(
        "0,1", "--sharing", help="parameter sharing values in [0, 1] (0: orthogonal group gradients, 1: aligned)"
    ),
    regime: str = typer.Option(
        "adam,adam+clip,sgd,sgd+clip",
        "--regime",
        help="optimiser regimes: adam, adam+clip, sgd, sgd+clip (daro_lab/testbed/grid.py REGIMES)",
    ),
    mix: str = typer.Option("uniform,easy-heavy", "--mix", help="level mixes: uniform, easy-heavy, hard-heavy"),
    lengths: str = typer.Option(
        "learned,fixed",
        "--lengths",
        help="'learned' (the policy may shorten its answers) and/or 'fixed' (the length gap persists)",
    ),
    workers: int = typer.Option(2, "--workers", help="processes (one per core)"),
    out: Path = typer.Option(
        Path("reports/testbed"), "--out", "-o", help="folder for the tables, the summary and the figure"
    ),
    from_runs: Optional[Path] = typer.Option(
        None,
        "--from-runs",
        help="no runs: rewrite the summaries and the figure from a folder's testbed_per_run.csv and testbed_meta.json",
    ),
) -> None:
    """Arms x paired seeds on the synthetic testbed, in every cell of a grid of knobs: AUC differences with their MDD."""
    _quiet_analysis()
    from analyses.testbed import plot_testbed
    from daro_lab.testbed import ARMS
    from daro_lab.testbed.grid import cells, run_experiment, write_reports
    from daro_lab.testbed.model import TestbedConfig

    if from_runs is not None:
        import json

        import pandas as pd

        try:
            per_run = pd.read_csv(from_runs / "testbed_per_run.csv")
            meta = json.loads((from_runs / "testbed_meta.json").read_text())
            reference = meta["reference"]
            missing = {"arm", "seed", "auc", "auc_hardest", "regime", "sharing", "mix", "lengths"} - set(
                per_run.columns
            )
        except (OSError, ValueError, KeyError) as e:
            _fail(
                f"--from-runs {from_runs}: needs testbed_per_run.csv and testbed_meta.json written by daro-lab testbed ({e})"
            )
        if missing:
            _fail(f"--from-runs {from_runs}/testbed_per_run.csv: missing column(s) {', '.join(sorted(missing))}")
        if reference not in set(per_run.arm):
            _fail(f"--from-runs {from_runs}: the reference arm {reference!r} has no runs")
        _writable_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {**write_reports(per_run, meta, out), "figure": plot_testbed(per_run, reference, out)}
        for kind, p in paths.items():
            for path in p.values() if isinstance(p, dict) else [p]:
                typer.echo(f"{kind:20s} {path}")
        return

    def split(text: str, what: str) -> list[str]:
        vals = [x.strip() for x in text.split(",") if x.strip()]
        if not vals:
            _fail(f"{what}: expected comma-separated values, got {text!r}")
        return vals

    arm_list = split(arms, "--arms")
    bad = [a for a in arm_list if a not in ARMS]
    if bad:
        _fail(f"--arms: unknown arm(s) {', '.join(bad)}; known: {', '.join(ARMS)}")
    if reference not in arm_list:
        _fail(f"--reference {reference!r} is not among --arms ({', '.join(arm_list)})")
    if not 2 <= seeds <= 100_000:
        _fail(f"--seeds: a paired comparison needs at least 2 seeds (at most 100000), got {seeds}")
    if workers < 1:
        _fail(f"--workers: at least 1, got {workers}")
    share_vals = _listify(_numbers(sharing, "--sharing"))
    try:
        base = TestbedConfig(steps=steps)
        grid = cells(
            sharing=share_vals,
            regime=split(regime, "--regime"),
            mix=split(mix, "--mix"),
            lengths=split(lengths, "--lengths"),
        )
    except ValueError as e:
        _fail(str(e))
    _writable_dir(out)
    n = len(grid) * len(arm_list) * seeds
    typer.echo(
        f"{len(grid)} cell(s) x {len(arm_list)} arms x {seeds} seeds = {n} runs of {steps} steps, {workers} worker(s)",
        err=True,
    )
    every = max(1, n // 20)

    def progress(i, total):
        if i % every == 0 or i == total:
            typer.echo(f"  {i}/{total} runs", err=True)

    result = run_experiment(grid, arm_list, list(range(seeds)), out, base, workers, reference, progress)
    result["paths"]["figure"] = plot_testbed(result["per_run"], reference, out)
    typer.echo(f"{result['runs']} runs in {result['seconds']:.0f} s")
    for kind, p in result["paths"].items():
        for path in p.values() if isinstance(p, dict) else [p]:
            typer.echo(f"{kind:20s} {path}")


def _listify(x: float | list[float]) -> list[float]:
    return x if isinstance(x, list) else [x]


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", help="port on 127.0.0.1, 1-65535 (0: a free one, printed)"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
) -> None:
    """Start the MLflow UI on 127.0.0.1 against the same store."""
    import socket
    import subprocess

    from daro_lab.tracking import TrackingError, open_client, resolve_tracking_uri

    if not 0 <= port <= 65535:
        _fail(f"--port {port}: expected a port number in 1-65535 (0: a free one)")
    with socket.socket() as probe:  # the server would fail to bind later, after its start-up
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            _fail(f"port {port} on 127.0.0.1 is not free ({e.strerror}); choose another with --port")
        port = probe.getsockname()[1]  # --port 0: the free port the system chose, which the server then takes
    uri = resolve_tracking_uri(tracking_uri)
    try:
        open_client(uri)  # a bad URI is named here; a new sqlite store gets its schema once, under its lock
    except TrackingError as e:
        _fail(str(e))
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)")

    def stop(signum, frame):  # SIGTERM, SIGHUP (terminal closed): stop the server too
        raise KeyboardInterrupt

    stops = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    for s in stops[1:]:
        signal.signal(s, stop)
    # the server in its own process group (so that a terminal's signals reach this command alone), stopped with
    # all its workers when this command stops, whatever stops it
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    asked = False
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        asked, code = True, 0
    finally:
        for s in stops:  # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not asked:
        _fail(f"the MLflow server on port {port} exited by itself (code {code})", code=1)
    raise typer.Exit(0)


@app.command()
def demo(
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps per method (default: the preset's)"),
    seed: int = typer.Option(0, "--seed", help="one seed for every run"),
    methods: str = typer.Option(
        "grpo,dapo,dr_grpo,lipo,daro", "--methods", help="comma-separated methods to train, in order"
    ),
    set_: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)"
    ),
) -> None:
    """The embedded default: GRPO, DAPO, Dr. GRPO, LIPO and DARO on the tiny preset (chain task), same seed,
    recorded in MLflow; then `daro-lab report --experiment daro-lab-demo` draws the figures."""
    from daro_lab.tracking import read_metrics, resolve_tracking_uri

    _quiet()
    uri = resolve_tracking_uri(tracking_uri)
    demo_cfg = Path(__file__).resolve().parent / "presets" / "demo.toml"
    results = []
    chosen = methods.replace(",", " ").split()
    if not chosen:
        _fail("--methods names no method")
    configs = {}
    for method in chosen:  # every method's config is checked before the first one trains
        overrides = [f"algo.method={method}", f"seed={seed}", *(set_ or [])]
        if steps is not None:
            overrides.append(f"trainer.steps={steps}")
        try:
            configs[method] = load_config(demo_cfg, overrides)
        except ConfigError as e:
            _fail(f"--methods {method}: {e}")
    for method, cfg in configs.items():
        run_id = _run_training(cfg, tracking_uri=uri)
        m = read_metrics(uri, run_id)
        acc = {k: m[m.key == EVAL_ACC[k]].sort_values("step").value for k in ("sampled", "greedy")}
        results.append((method, run_id, *(a.iloc[i] for a in acc.values() for i in (0, -1))))
    typer.echo(f"\nexperiment '{cfg.tracking.experiment}' in {uri}; held-out accuracy at start -> end")
    typer.echo(
        f"{'method':8s} {'run id':34s} {'sampled (avg@' + str(cfg.trainer.eval_samples) + ')':>18s} {'greedy':>16s}"
    )
    for method, run_id, s0, s1, g0, g1 in results:
        typer.echo(f"{method:8s} {run_id:34s} {s0:8.3f} -> {s1:.3f} {g0:8.3f} -> {g1:.3f}")
    typer.echo("\nOpen them side by side: daro-lab ui" + (f" --tracking-uri {uri}" if tracking_uri else ""))
    typer.echo(
        f"Figures and report: daro-lab report --experiment {cfg.tracking.experiment}"
        + (f" --tracking-uri {uri}" if tracking_uri else "")
    )


@app.command("analyze-rollouts")
def analyze_rollouts(
    path: Path = typer.Argument(
        ...,
        help="rollout dump: verl's trainer.rollout_data_dir folder (or one {step}.jsonl), or a .jsonl / .parquet table (or a folder of them)",
    ),
    fmt: str = typer.Option(
        "verl",
        "--format",
        "-f",
        help="verl (fields input, output, score, step), jsonl or parquet (step, prompt_id or prompt, response or response_length, reward)",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="output folder (default: reports/rollouts-<name of PATH>)"
    ),
    tokenizer: Optional[Path] = typer.Option(
        None,
        "--tokenizer",
        help="local tokenizer folder: lengths in its tokens (default: characters; --length-unit words)",
    ),
    length_unit: str = typer.Option(
        "chars", "--length-unit", help="chars or words: the length of a response's text when no tokenizer is given"
    ),
    num_responses: Optional[int] = typer.Option(
        None, "--num-responses", "-k", min=2, help="responses per prompt K (default: the most common group size)"
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="a reward > T is a right answer (default: rewards must be 0 or 1)"
    ),
    reward_field: Optional[str] = typer.Option(
        None,
        "--reward-field",
        help="field of the reward (verl: score; e.g. acc for verl's DAPO recipe; tables: reward)",
    ),
    prompt_field: Optional[str] = typer.Option(
        None, "--prompt-field", help="field naming the prompt (verl: input; tables: prompt_id, else prompt)"
    ),
    response_field: Optional[str] = typer.Option(
        None, "--response-field", help="field of the response text (verl: output; tables: response)"
    ),
    length_field: Optional[str] = typer.Option(
        None,
        "--length-field",
        help="field of the response length, used where there is no text (tables: response_length)",
    ),
    step_field: Optional[str] = typer.Option(None, "--step-field", help="field of the training step (default: step)"),
    updates: int = typer.Option(600, "--updates", min=1, help="DARO weight updates to simulate (the paper: 600)"),
    lr_w: float = typer.Option(1e-3, "--lr-w", help="learning rate of DARO's weights in the simulation"),
    reading: Optional[List[str]] = typer.Option(
        None, "--reading", help="DARO reading 'signal[:reg[:ema]]', repeatable (default: the simulator's five)"
    ),
    no_simulate: bool = typer.Option(False, "--no-simulate", help="skip the DARO simulation"),
    seed: int = typer.Option(0, "--seed", help="seed of the simulated mini-batches"),
) -> None:
    """The loss scale issue on a run daro-lab never trained: per-mu figures and tables from its rollout dump."""
    _quiet_analysis()
    import dataclasses

    from analyses.rollouts import plot_rollouts
    from daro_lab.integrations.rollouts import RolloutError, analyze, default_fields, read_rollouts, safe_name
    from daro_lab.simulate import DEFAULT_READINGS

    out = _writable_dir(
        out or Path("reports") / f"rollouts-{safe_name(path.resolve().stem if path.is_file() else path.resolve().name)}"
    )
    try:
        base = default_fields(fmt)
        given = {
            "reward": reward_field,
            "prompt": prompt_field,
            "response": response_field,
            "length": length_field,
            "step": step_field,
        }
        fields = dataclasses.replace(base, **{k: v for k, v in given.items() if v})
        if prompt_field:
            fields = dataclasses.replace(fields, prompt_fallback=None)
        data = read_rollouts(
            path,
            fmt,
            fields=fields,
            tokenizer=tokenizer,
            length_unit=length_unit,
            threshold=threshold,
            num_responses=num_responses,
        )
        analysis = analyze(
            data,
            simulate=not no_simulate,
            updates=updates,
            lr_w=lr_w,
            readings=list(reading or DEFAULT_READINGS),
            seed=seed,
        )
    except (RolloutError, ValueError) as e:
        _fail(str(e))
    result = plot_rollouts(analysis, out)
    for note in result.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    pd_opts = {"index": False, "float_format": lambda x: f"{x:.3g}"}
    typer.echo(
        "Loss scale by pass rate (S per prompt as a share over mu: measured on the dump, equal lengths, the "
        "dump's lengths; each group's share of the summed S)\n"
        + analysis.scale[
            ["method", "k", "prompts", "S_share_per_prompt", "equal_length_share", "length_corrected_share", "S_share"]
        ].to_string(**pd_opts)
    )
    if analysis.simulation is not None:
        d = result.tables["rollout_daro"]
        d = d[d.w_final.notna()] if "w_final" in d else d
        typer.echo(
            "\nDARO on mini-batches shaped like the dump: final w and w*signal/C (1 = the fixed point)\n"
            + d[["run", "k", "w_final", "wS"]].to_string(**pd_opts)
        )
    for kind, p in result.paths.items():
        typer.echo(f"{kind:26s} {p}")
    typer.echo(f"\n{result.caption}")


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(app())


if __name__ == "__main__":
    main()
