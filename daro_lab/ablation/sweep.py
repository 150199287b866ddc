"""Running an ablation: one MLflow parent run, one nested child run per arm and seed.

    from daro_lab.ablation import run_ablation
    res = run_ablation("static-weights", preset="tiny", seeds=3)          # a new sweep
    res = run_ablation("static-weights", resume=res.parent_run_id)        # continue an interrupted one
    res.summary        # one row per arm (see daro_lab.ablation.summary)

Children are tagged `daro_lab.ablation`, `daro_lab.arm`, `daro_lab.seed` (and `daro_lab.arm_label`)
and named `<arm>-seed<seed>`, so the MLflow UI groups and compares them. Jobs run seed by seed
(every arm of seed 0, then of seed 1, ...), arms in grid order, so an interrupted sweep has complete
comparisons for its first seeds.

Resume (`resume=PARENT_RUN_ID`) runs the plan logged with the parent (its config.json), not the
grid file as it is now: FINISHED children are kept as they are; RUNNING or KILLED ones continue from
their last checkpoint (`train(resume=...)`), or, without a checkpoint, are tagged superseded, deleted
(soft: `mlflow runs restore` brings one back) and started afresh; FAILED ones stay FAILED unless
`retry_failed`, which continues them from their checkpoint or starts them afresh.

A crashed arm is FAILED (with traceback.txt) and the sweep goes on; an arm that fails before its
run exists (bad static weights, a model that does not load) gets a FAILED child run with the
traceback all the same, so every (arm, seed) of the plan has exactly one child. An arm whose weights
come from another (`static_from`) waits for that arm's child of the same seed, and fails with a
clear message if that one did not finish. The parent ends FINISHED when every child finished,
FAILED otherwise (tag `daro_lab.arms_failed` names them), KILLED on Ctrl-C.

The executors (local, Ray) that run each arm: `executors.py`. What the sweep left in the store, read
back as a summary: `collect.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daro_lab.ablation.collect import AblationResult, find_children, load_plan, summarize_ablation
from daro_lab.ablation.executors import EXECUTORS, ArmResult, ArmTask, lost_worker, make_executor
from daro_lab.ablation.grid import AblationError, Grid, Plan, make_plan
from daro_lab.record import (
    ROLE_PARENT,
    TAG_ABLATION,
    TAG_ARM,
    TAG_ARMS_FAILED,
    TAG_CHECKPOINT_DIR,
    TAG_ROLE,
    TAG_SEED,
    TAG_STATIC_FROM,
    TAG_STATIC_WEIGHTS,
    TAG_SUPERSEDED,
)
from daro_lab.record import TAG_ARM_LABEL as TAG_LABEL


def _has_checkpoint(run: Any) -> bool:
    from daro_lab.trainer.checkpoint import resume_point

    root = run.data.tags.get(TAG_CHECKPOINT_DIR)
    return bool(root) and resume_point(root)[0] is not None


def _final_weights(uri: str, run_id: str, K: int) -> dict[int, float]:
    """The final DARO weights {k: w} a finished child logged (last step of `daro/weight/mu_kofK`)."""
    from daro_lab.record import mu_key
    from daro_lab.tracking import read_metrics

    keys = [f"daro/weight/{mu_key(k, K)}" for k in range(1, K)]
    m = read_metrics(uri, run_id, keys)
    out = {}
    for k, key in enumerate(keys, start=1):
        d = m[m.key == key].sort_values("step")
        if d.empty or not math.isfinite(float(d.value.iloc[-1])):
            raise AblationError(f"run {run_id} logged no finite final weight {key}: cannot freeze its weights")
        out[k] = float(d.value.iloc[-1])
    return out


def run_ablation(
    name: str | Path | Grid | None = None,
    preset: str = "tiny",
    seeds: int | list[int] | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
    executor: str = "local",
    tracking_uri: str | None = None,
    resume: str | None = None,
    retry_failed: bool = False,
    workers: int | None = None,
    hooks: Any = None,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    ray_address: str | None = None,
    experiment: str | None = None,
    init_seed: str | None = None,
) -> AblationResult:
    """Run ablation `name` (a grid name, a grid file, or a Grid) as a parent run with one child per
    arm and seed, or continue the sweep of parent run `resume`; return its summary.

    Bad grids, presets, overrides and resume ids raise AblationError (or TrackingError for the
    store) before any run is created. `hooks` is passed to every train() (a picklable factory for
    the process pool and Ray)."""
    from daro_lab.tracking import RunStore, Tracker

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    say = echo or (lambda _m: None)
    if executor not in EXECUTORS:
        raise AblationError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    store = RunStore(tracking_uri)
    uri = store.uri
    if resume:
        plan = load_plan(store, resume)
        if name is not None and not isinstance(name, Grid) and Path(str(name)).stem != plan.name:
            raise AblationError(f"run {resume} is ablation {plan.name!r}, not {Path(str(name)).stem!r}")
    else:
        if name is None:
            raise AblationError("name an ablation grid (or pass resume=PARENT_RUN_ID)")
        plan = make_plan(
            name, preset, seeds, steps, overrides, experiment, check_paths=executor != "ray", init_seed=init_seed
        )
    ex = make_executor(executor, plan, workers, ray_address)  # e.g. Ray missing: fails before any run
    try:
        if resume:
            tracker = Tracker.resume(uri, resume)
            say(f"resuming ablation '{plan.name}' (parent run {resume}) in experiment '{plan.experiment}'")
        else:
            tracker = _start_parent(uri, plan, executor)
            say(
                f"ablation '{plan.name}': parent run {tracker.run_id} in experiment '{plan.experiment}' of {uri}; "
                f"{len(plan.arms)} arms x {len(plan.seeds)} seeds"
            )
    except BaseException:
        ex.close()
        raise
    parent_id = tracker.run_id
    try:
        if ex.parallel and (executor == "local" or ray_address is None):
            _prewarm(plan, say, getattr(ex, "workers", 1))
        results = _schedule(plan, uri, parent_id, ex, hooks, progress and not ex.parallel, retry_failed, say)
        res = summarize_ablation(uri, parent_id, plan=plan, write=True)
        res.results = results
        failed = [f"{r.arm}/seed{r.seed}" for r in results if r.status != "FINISHED"]
        if failed:
            tracker.set_tags({TAG_ARMS_FAILED: ", ".join(failed)})
        else:  # a resume that fixed them
            store.delete_tag(parent_id, TAG_ARMS_FAILED)
        tracker.finish("FAILED" if failed else "FINISHED")
        res.status = "FAILED" if failed else "FINISHED"
        return res
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException as e:
        tracker.fail(e)
        raise
    finally:
        ex.close()


def _start_parent(uri: str, plan: Plan, executor: str):
    """The parent run: the plan as its config.json, the grid's choices as params, the arms as its note."""
    from daro_lab.tracking import Tracker

    params = {
        "ablation.name": plan.name,
        "ablation.preset": plan.preset,
        "ablation.seeds": plan.seeds,
        "ablation.steps": plan.steps if plan.steps is not None else "preset",
        "ablation.arms": ", ".join(a.name for a in plan.arms),
        "ablation.reference": plan.reference,
        "ablation.set": " ".join(plan.cli_set),
        "ablation.grid": plan.grid_path,
        "ablation.executor": executor,
        "ablation.test": plan.test,
    }
    note = (
        (plan.description.strip() + "\n\n" if plan.description else "")
        + "Arms:\n"
        + "\n".join(
            f"- {a.name}{' (' + a.label + ')' if a.label else ''}: {' '.join(a.overrides) or '(preset)'}"
            + (f"; weights frozen from arm '{a.static_from}'" if a.static_from else "")
            for a in plan.arms
        )
    )
    return Tracker.start(
        uri,
        plan.experiment,
        f"ablation-{plan.name}",
        params,
        plan.to_json(),
        tags={TAG_ABLATION: plan.name, TAG_ROLE: ROLE_PARENT, "mlflow.note.content": note},
    )


def _prewarm(plan: Plan, say: Callable[[str], None], workers: int = 1) -> None:
    """Warm-start (and cache) the tiny models of the arms here, before parallel workers start, so that they do not
    all train the same warm start at once (it is keyed by model and task config and model.init_seed). Distinct warm
    starts (init_seed = 'per_seed': one a seed) train in up to `workers` processes at once; each trains at one
    thread (models.warmstart.WARMSTART_THREADS), so the parallel warm start equals the serial one."""
    from daro_lab.config import config_from_dict
    from daro_lab.models.warmstart import INFO_FILE, cache_path

    todo: dict[Path, tuple] = {}
    for pa in plan.arms:
        cfg = config_from_dict(json.loads(json.dumps(pa.config)))
        if cfg.model.path:
            continue
        for init in plan.seeds if plan.init_seed == "per_seed" else [cfg.model.init_seed]:
            p = cache_path(cfg.model, cfg.task, init)
            if p not in todo and not (p / INFO_FILE).is_file():
                todo[p] = (cfg.model, cfg.task, init)
    if not todo:
        return
    n = max(1, min(workers, len(todo)))
    say(f"warm-starting the tiny model for the parallel arms: {len(todo)} warm start(s), {n} at a time")
    if n == 1:
        for job in todo.values():
            _warm_start(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_warm_start, todo.values()))  # a worker's error is raised here


def _warm_start(job: tuple) -> None:
    """One warm start, cached (a process pool's job: module level so that it pickles)."""
    from daro_lab.models.warmstart import warm_start

    warm_start(*job)


def _schedule(
    plan: Plan, uri: str, parent_id: str, ex, hooks, progress: bool, retry_failed: bool, say: Callable[[str], None]
) -> list[ArmResult]:
    from daro_lab.tracking import RunStore

    store = RunStore(uri)
    jobs = [(a.name, s) for s in plan.seeds for a in plan.arms]
    results: dict[tuple[str, int], ArmResult] = {}
    todo: list[tuple[str, int, str | None]] = []  # arm, seed, run id to continue
    existing: dict[tuple[str, int], Any] = {}
    for run in find_children(store, parent_id):
        key = (run.data.tags.get(TAG_ARM), int(run.data.tags.get(TAG_SEED, -1)))
        existing.setdefault(key, run)  # newest first
    for arm, seed in jobs:
        run = existing.get((arm, seed))
        if run is None:
            todo.append((arm, seed, None))
            continue
        st, rid = run.info.status, run.info.run_id
        if st == "FINISHED" or (st == "FAILED" and not retry_failed):
            results[(arm, seed)] = ArmResult(arm, seed, rid, st, action="kept")
            say(f"  {arm} seed {seed}: {st} run {rid} kept")
        elif _has_checkpoint(run):
            todo.append((arm, seed, rid))
        else:
            store.supersede(run, f"{st} without a checkpoint; restarted by the resume of {parent_id}", TAG_SUPERSEDED)
            say(f"  {arm} seed {seed}: {st} run {rid} had no checkpoint: deleted, starting afresh")
            todo.append((arm, seed, None))
    # parallel jobs share the machine: each gets the grid's num_cpus threads (unless its config sets some)
    threads = max(1, math.ceil(plan.num_cpus)) if ex.parallel else None
    n_total, running = len(jobs), {}
    n_done = len(results)
    try:
        while todo or running:
            for item in list(todo):
                if len(running) >= ex.capacity:
                    break
                arm, seed, rid = item
                pa = plan.arm(arm)
                task = _task(plan, uri, parent_id, pa, seed, rid, hooks, progress, threads)
                if pa.static_from:
                    src = results.get((pa.static_from, seed))
                    if src is None:
                        continue  # its source is still to run
                    if src.status != "FINISHED":
                        task.fail_with = (
                            f"arm '{pa.static_from}' seed {seed} did not finish ({src.status}, run "
                            f"{src.run_id}): no final weights to freeze for arm '{arm}'"
                        )
                    else:
                        try:
                            K = plan.arm(arm).config["rollout"]["num_responses"]
                            task.static_weights = _final_weights(uri, src.run_id, K)
                            task.tags[TAG_STATIC_FROM] = src.run_id
                            task.tags[TAG_STATIC_WEIGHTS] = json.dumps(task.static_weights)
                        except Exception as e:  # noqa: BLE001
                            task.fail_with = f"cannot read the final weights of run {src.run_id}: {e}"
                todo.remove(item)
                what = f"continuing run {rid}" if rid else "starting"
                say(f"[{n_done + len(running) + 1}/{n_total}] {arm} seed {seed}: {what}")
                running[ex.submit(task, plan.gpus(arm))] = task
            if not running:
                raise AblationError(f"ablation {plan.name}: jobs {todo} can never start (their source arm is missing)")
            h = ex.wait_any(list(running))
            task = running.pop(h)
            arm, seed = task.arm, task.seed
            try:
                r = ex.result(h)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a worker that died (Ray, process pool)
                r = lost_worker(store, task, e)
            results[(arm, seed)] = r
            n_done += 1
            say(
                f"  {arm} seed {seed}: {r.status} run {r.run_id} ({r.seconds:.1f} s)"
                + (f": {r.error}" if r.error else "")
            )
    except KeyboardInterrupt:
        ex.cancel(list(running))
        raise
    return [results[j] for j in jobs if j in results]


def _task(
    plan: Plan,
    uri: str,
    parent_id: str,
    pa,
    seed: int,
    resume_id: str | None,
    hooks,
    progress,
    threads: int | None = None,
) -> ArmTask:
    cfg = json.loads(json.dumps(pa.config))
    if threads:
        _set_threads(cfg, threads)
    cfg["seed"] = seed
    if plan.init_seed == "per_seed":  # the warm start varies with the seed too (each seed its own cached one)
        cfg["model"]["init_seed"] = seed
    cfg["tracking"]["run_name"] = f"{pa.name}-seed{seed}"
    cfg["tracking"]["uri"] = uri
    tags = {TAG_ABLATION: plan.name, TAG_ARM: pa.name, TAG_SEED: str(seed)}
    if pa.label:
        tags[TAG_LABEL] = pa.label
    static_path = None
    if pa.static_from:
        static_path = str(
            Path(cfg["trainer"]["checkpoint_dir"]) / f"ablation-{parent_id}" / f"{pa.name}-seed{seed}-weights.json"
        )
        cfg["algo"]["daro"]["static"] = static_path
    return ArmTask(
        uri,
        parent_id,
        plan.experiment,
        pa.name,
        seed,
        None if resume_id else cfg,
        tags,
        resume_run_id=resume_id,
        static_path=static_path,
        hooks=hooks,
        progress=progress,
    )


def _set_threads(cfg: dict, n: int) -> None:
    if not cfg["trainer"].get("threads"):
        cfg["trainer"]["threads"] = n
