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

Executors: 'local' runs the jobs one after another in this process, or in a process pool of
`workers` processes when the machine has the cores (default: usable cores // the grid's num_cpus,
and one at a time for arms on a GPU); a parallel sweep warm-starts the tiny model once first;
'ray' submits each job as a Ray task with the grid's `num_cpus` and `num_gpus` (default: one GPU for
arms on trainer.device cuda) (ray.init(address) when Ray is not initialised:
`address=None` starts a local instance, 'auto' joins a running cluster).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from daro_lab.ablation import summary as S
from daro_lab.ablation.grid import AblationError, Grid, Plan, make_plan
from daro_lab.record import (TAG_ABLATION, TAG_ARM, TAG_ARMS_FAILED, TAG_CHECKPOINT_DIR, TAG_PARENT, TAG_ROLE,
                             TAG_SEED, TAG_STATIC_FROM, TAG_STATIC_WEIGHTS, TAG_SUPERSEDED)
from daro_lab.record import TAG_ARM_LABEL as TAG_LABEL

ROLE_PARENT = "ablation-parent"

SUMMARY_TABLE = "ablation_summary"  # tables/ablation_summary.parquet on the parent (read_table)
PER_SEED_TABLE = "ablation_per_seed"
SUMMARY_MD = "ablation_summary.md"

EXECUTORS = ("local", "ray")


# --------------------------------------------------------------------------------------------
# One job: an arm at a seed


@dataclass
class ArmTask:
    """What a worker needs to run (or continue) one child run; picklable for process pools and Ray."""

    uri: str
    parent_run_id: str
    experiment: str
    arm: str
    seed: int
    config: dict[str, Any] | None  # resolved config of a new child; None when continuing one
    tags: dict[str, str]
    resume_run_id: str | None = None
    static_weights: dict[int, float] | None = None
    static_path: str | None = None
    hooks: Any = None  # hooks factory for train(); None: the default hooks
    progress: bool = False
    fail_with: str | None = None  # record a FAILED child with this message instead of training


@dataclass
class ArmResult:
    arm: str
    seed: int
    run_id: str | None
    status: str  # FINISHED, FAILED, KILLED
    error: str = ""
    action: str = "ran"  # ran, resumed, kept
    seconds: float = 0.0


def _child_filter(parent_run_id: str, arm: str | None = None, seed: int | None = None) -> str:
    f = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    if arm is not None:
        f += f" and tags.`{TAG_ARM}` = '{arm}'"
    if seed is not None:
        f += f" and tags.`{TAG_SEED}` = '{seed}'"
    return f


def find_children(client: Any, parent_run_id: str, arm: str | None = None, seed: int | None = None) -> list:
    """Active child runs of a parent (optionally of one arm/seed), newest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], _child_filter(parent_run_id, arm, seed),
                              max_results=50000, order_by=["attributes.start_time DESC"])


def _fail_child(task: ArmTask, exc: BaseException) -> str:
    """A FAILED child run holding the traceback of `exc`, for an arm that failed before its run existed."""
    from daro_lab.tracking import Tracker

    cfg_json, params = "{}", {}
    if task.config is not None:
        from daro_lab.config import config_from_dict

        try:
            cfg = config_from_dict(json.loads(json.dumps(task.config)))
            cfg_json, params = cfg.to_json(), cfg.flat()
        except Exception:  # noqa: BLE001 - the config itself may be what failed
            cfg_json = json.dumps(task.config)
    tags = {"daro_lab.method": (task.config or {}).get("algo", {}).get("method", ""), **task.tags}
    tr = Tracker.start(task.uri, task.experiment, f"{task.arm}-seed{task.seed}", params, cfg_json, tags=tags,
                       parent_run_id=task.parent_run_id)
    tr.fail(exc)
    return tr.run_id


def run_arm(task: ArmTask) -> ArmResult:
    """Train one arm at one seed as a child of the parent run; never raises for a crash of the arm
    (it is FAILED and reported), only for KeyboardInterrupt (the child is KILLED, checkpoint saved)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from daro_lab.config import config_from_dict
    from daro_lab.hooks import default_hooks
    from daro_lab.tracking import open_client
    from daro_lab.trainer import train

    t0 = time.perf_counter()
    hooks = task.hooks or default_hooks
    try:
        if task.fail_with:
            raise AblationError(task.fail_with)
        if task.static_weights is not None and task.static_path:
            p = Path(task.static_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({str(k): v for k, v in sorted(task.static_weights.items())}, indent=1))
        if task.resume_run_id:
            run_id = train(resume=task.resume_run_id, hooks=hooks, progress=task.progress, tracking_uri=task.uri)
            action = "resumed"
        else:
            cfg = config_from_dict(json.loads(json.dumps(task.config)))
            run_id = train(cfg, hooks=hooks, progress=task.progress, tracking_uri=task.uri,
                           parent_run_id=task.parent_run_id, tags=task.tags)
            action = "ran"
        return ArmResult(task.arm, task.seed, run_id, "FINISHED", action=action, seconds=time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - an arm's crash must not stop the sweep
        msg = f"{type(exc).__name__}: {exc}"
        run_id = task.resume_run_id
        try:
            if run_id is None:
                client = open_client(task.uri)
                found = find_children(client, task.parent_run_id, task.arm, task.seed)
                run_id = found[0].info.run_id if found else None
                if run_id is not None and found[0].info.status == "RUNNING":
                    client.set_terminated(run_id, "FAILED")
            if run_id is None:  # failed before train() created the run
                run_id = _fail_child(task, exc)
        except Exception as inner:  # noqa: BLE001
            msg += f" (and recording the failure failed: {type(inner).__name__}: {inner})"
        return ArmResult(task.arm, task.seed, run_id, "FAILED", msg, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Executors


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Done:
    """A finished 'future' for the in-process executor."""

    def __init__(self, fn: Callable, arg: Any):
        self.value, self.exc = None, None
        try:
            self.value = fn(arg)
        except Exception as e:  # noqa: BLE001 - KeyboardInterrupt propagates
            self.exc = e

    def result(self):
        if self.exc is not None:
            raise self.exc
        return self.value


class LocalExecutor:
    """Jobs in this process one after another (workers=1), or in a spawn process pool."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))

    @property
    def capacity(self) -> int:
        return self.workers

    @property
    def parallel(self) -> bool:
        return self.pool is not None

    def submit(self, task: ArmTask, num_gpus: float = 0):
        if self.pool is None:
            return _Done(run_arm, task)
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(run_arm, task)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a fresh pool
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            return self.pool.submit(run_arm, task)

    def wait_any(self, handles: list) -> Any:
        if self.pool is None:
            return handles[0]
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return next(iter(done))

    def result(self, handle) -> ArmResult:
        return handle.result()

    def cancel(self, handles: list) -> None:
        for h in handles:
            if hasattr(h, "cancel"):
                h.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Each job a Ray task with `num_cpus` CPUs; Ray queues what does not fit."""

    name = "ray"

    def __init__(self, num_cpus: float = 2, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise AblationError("the 'ray' executor needs Ray: pip install 'daro-lab[ray]'") from e
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            # a local instance's workers inherit this environment (MLFLOW_DISABLE_TELEMETRY included)
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
            self.started = True
        self.remote = ray.remote(num_cpus=num_cpus, max_retries=0)(run_arm)

    capacity = 1 << 30  # Ray schedules by resources
    parallel = True

    def submit(self, task: ArmTask, num_gpus: float = 0):
        return self.remote.options(num_gpus=num_gpus).remote(task)

    def wait_any(self, handles: list) -> Any:
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        return ready[0]

    def result(self, handle) -> ArmResult:
        return self.ray.get(handle)

    def cancel(self, handles: list) -> None:
        for h in handles:
            try:
                self.ray.cancel(h)  # KeyboardInterrupt in the task: the child saves and is KILLED
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, plan: Plan, workers: int | None = None, ray_address: str | None = None):
    if kind == "local":
        if workers is None:  # arms on a GPU share it: one at a time unless told otherwise
            on_gpu = any(plan.gpus(a.name) > 0 for a in plan.arms)
            workers = 1 if on_gpu else max(1, usable_cpus() // max(1, math.ceil(plan.num_cpus)))
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(plan.num_cpus, ray_address)
    raise AblationError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass
class AblationResult:
    parent_run_id: str
    status: str  # of the parent: FINISHED or FAILED
    summary: pd.DataFrame
    per_seed: pd.DataFrame
    markdown: str
    plan: Plan
    results: list[ArmResult] = field(default_factory=list)
    uri: str = ""


def _has_checkpoint(run: Any) -> bool:
    from daro_lab.trainer.checkpoint import latest
    root = run.data.tags.get(TAG_CHECKPOINT_DIR)
    return bool(root) and latest(root) is not None


def _final_weights(uri: str, run_id: str, K: int) -> dict[int, float]:
    """The final DARO weights {k: w} a finished child logged (last step of `daro/weight/mu_kofK`)."""
    from daro_lab.algorithms import mu_key
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


def _supersede(client: Any, run: Any, why: str) -> None:
    rid = run.info.run_id
    client.set_tag(rid, TAG_SUPERSEDED, why)
    if run.info.status == "RUNNING":
        client.set_terminated(rid, "KILLED")
    client.delete_run(rid)


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
) -> AblationResult:
    """Run ablation `name` (a grid name, a grid file, or a Grid) as a parent run with one child per
    arm and seed, or continue the sweep of parent run `resume`; return its summary.

    Bad grids, presets, overrides and resume ids raise AblationError (or TrackingError for the
    store) before any run is created. `hooks` is passed to every train() (a picklable factory for
    the process pool and Ray)."""
    from daro_lab.tracking import Tracker, open_client, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    say = echo or (lambda _m: None)
    if executor not in EXECUTORS:
        raise AblationError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    uri = resolve_tracking_uri(tracking_uri)
    client = open_client(uri)
    if resume:
        plan = load_plan(client, resume)
        if name is not None and not isinstance(name, Grid) and Path(str(name)).stem != plan.name:
            raise AblationError(f"run {resume} is ablation {plan.name!r}, not {Path(str(name)).stem!r}")
    else:
        if name is None:
            raise AblationError("name an ablation grid (or pass resume=PARENT_RUN_ID)")
        plan = make_plan(name, preset, seeds, steps, overrides, experiment, check_paths=executor != "ray")
    ex = make_executor(executor, plan, workers, ray_address)  # e.g. Ray missing: fails before any run
    try:
        if resume:
            tracker = Tracker.resume(uri, resume)
            say(f"resuming ablation '{plan.name}' (parent run {resume}) in experiment '{plan.experiment}'")
        else:
            tracker = _start_parent(uri, plan, executor)
            say(f"ablation '{plan.name}': parent run {tracker.run_id} in experiment '{plan.experiment}' of {uri}; "
                f"{len(plan.arms)} arms x {len(plan.seeds)} seeds")
    except BaseException:
        ex.close()
        raise
    parent_id = tracker.run_id
    try:
        if ex.parallel and (executor == "local" or ray_address is None):
            _prewarm(plan, say)
        results = _schedule(plan, uri, parent_id, ex, hooks, progress and not ex.parallel, retry_failed, say)
        res = summarize_ablation(uri, parent_id, plan=plan, write=True)
        res.results = results
        failed = [f"{r.arm}/seed{r.seed}" for r in results if r.status != "FINISHED"]
        if failed:
            tracker.set_tags({TAG_ARMS_FAILED: ", ".join(failed)})
        elif TAG_ARMS_FAILED in client.get_run(parent_id).data.tags:  # a resume that fixed them
            client.delete_tag(parent_id, TAG_ARMS_FAILED)
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

    params = {"ablation.name": plan.name, "ablation.preset": plan.preset, "ablation.seeds": plan.seeds,
              "ablation.steps": plan.steps if plan.steps is not None else "preset",
              "ablation.arms": ", ".join(a.name for a in plan.arms), "ablation.reference": plan.reference,
              "ablation.set": " ".join(plan.cli_set), "ablation.grid": plan.grid_path,
              "ablation.executor": executor, "ablation.test": plan.test}
    note = (plan.description.strip() + "\n\n" if plan.description else "") + "Arms:\n" + "\n".join(
        f"- {a.name}{' (' + a.label + ')' if a.label else ''}: {' '.join(a.overrides) or '(preset)'}"
        + (f"; weights frozen from arm '{a.static_from}'" if a.static_from else "") for a in plan.arms)
    return Tracker.start(uri, plan.experiment, f"ablation-{plan.name}", params, plan.to_json(),
                         tags={TAG_ABLATION: plan.name, TAG_ROLE: ROLE_PARENT, "mlflow.note.content": note})


def _prewarm(plan: Plan, say: Callable[[str], None]) -> None:
    """Warm-start (and cache) the tiny model of the arms once here, before parallel workers start,
    so that they do not all train the same warm start at once (it is keyed by model and task
    config and model.init_seed, shared by every training seed)."""
    from daro_lab.config import config_from_dict
    from daro_lab.models.warmstart import INFO_FILE, cache_path, warm_start

    seen: set[Path] = set()
    for pa in plan.arms:
        cfg = config_from_dict(json.loads(json.dumps(pa.config)))
        if cfg.model.path:
            continue
        p = cache_path(cfg.model, cfg.task, cfg.model.init_seed)
        if p in seen or (p / INFO_FILE).is_file():
            continue
        seen.add(p)
        say(f"warm-starting the tiny model once for the parallel arms ({p})")
        warm_start(cfg.model, cfg.task, cfg.model.init_seed)


def load_plan(client: Any, parent_run_id: str) -> Plan:
    """The plan logged with an ablation's parent run."""
    from daro_lab.tracking.mlflow_run import _get_run

    run = _get_run(client, parent_run_id, client.tracking_uri, what="ablation parent run")
    if run.data.tags.get(TAG_ROLE) != ROLE_PARENT:
        raise AblationError(f"run {parent_run_id} is not the parent run of an ablation (no tag {TAG_ROLE}={ROLE_PARENT})")
    with tempfile.TemporaryDirectory(prefix="daro_plan_") as tmp:
        try:
            path = client.download_artifacts(parent_run_id, "config.json", tmp)
            return Plan.from_json(Path(path).read_text())
        except AblationError:
            raise
        except Exception as e:  # noqa: BLE001
            raise AblationError(f"ablation parent run {parent_run_id} has no readable plan (config.json): {e}") from e


def _schedule(plan: Plan, uri: str, parent_id: str, ex, hooks, progress: bool, retry_failed: bool,
              say: Callable[[str], None]) -> list[ArmResult]:
    from daro_lab.tracking import open_client

    client = open_client(uri)
    jobs = [(a.name, s) for s in plan.seeds for a in plan.arms]
    results: dict[tuple[str, int], ArmResult] = {}
    todo: list[tuple[str, int, str | None]] = []  # arm, seed, run id to continue
    existing: dict[tuple[str, int], Any] = {}
    for run in find_children(client, parent_id):
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
            _supersede(client, run, f"{st} without a checkpoint; restarted by the resume of {parent_id}")
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
                        task.fail_with = (f"arm '{pa.static_from}' seed {seed} did not finish ({src.status}, run "
                                          f"{src.run_id}): no final weights to freeze for arm '{arm}'")
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
                r = _lost_worker(client, task, e)
            results[(arm, seed)] = r
            n_done += 1
            say(f"  {arm} seed {seed}: {r.status} run {r.run_id} ({r.seconds:.1f} s)"
                + (f": {r.error}" if r.error else ""))
    except KeyboardInterrupt:
        ex.cancel(list(running))
        raise
    return [results[j] for j in jobs if j in results]


def _task(plan: Plan, uri: str, parent_id: str, pa, seed: int, resume_id: str | None, hooks, progress,
          threads: int | None = None) -> ArmTask:
    cfg = json.loads(json.dumps(pa.config))
    if threads:
        _set_threads(cfg, threads)
    cfg["seed"] = seed
    cfg["tracking"]["run_name"] = f"{pa.name}-seed{seed}"
    cfg["tracking"]["uri"] = uri
    tags = {TAG_ABLATION: plan.name, TAG_ARM: pa.name, TAG_SEED: str(seed)}
    if pa.label:
        tags[TAG_LABEL] = pa.label
    static_path = None
    if pa.static_from:
        static_path = str(Path(cfg["trainer"]["checkpoint_dir"]) / f"ablation-{parent_id}" / f"{pa.name}-seed{seed}-weights.json")
        cfg["algo"]["daro"]["static"] = static_path
    return ArmTask(uri, parent_id, plan.experiment, pa.name, seed, None if resume_id else cfg, tags,
                   resume_run_id=resume_id, static_path=static_path, hooks=hooks, progress=progress)


def _set_threads(cfg: dict, n: int) -> None:
    if not cfg["trainer"].get("threads"):
        cfg["trainer"]["threads"] = n


def _lost_worker(client, task: ArmTask, exc: Exception) -> ArmResult:
    """A worker died without reporting (Ray task lost, process pool broken): mark its child FAILED
    (or record a FAILED child when it died before creating one)."""
    msg = f"worker lost: {type(exc).__name__}: {exc}"
    found = find_children(client, task.parent_run_id, task.arm, task.seed)
    run_id = task.resume_run_id or (found[0].info.run_id if found else None)
    if run_id is not None:
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            client.log_text(run_id, msg, "traceback.txt")
            client.set_terminated(run_id, "FAILED")
    else:
        run_id = _fail_child(task, RuntimeError(msg))
    return ArmResult(task.arm, task.seed, run_id, "FAILED", msg)


# --------------------------------------------------------------------------------------------
# Summary from the store


def summarize_ablation(uri: str | None, parent_run_id: str, plan: Plan | None = None,
                       write: bool = False) -> AblationResult:
    """Recompute the summary of an ablation from what its child runs logged (and, with `write`,
    store it on the parent: tables/ablation_summary.parquet, tables/ablation_per_seed.parquet,
    ablation_summary.md, and per-arm metrics `<metric>_mean/<arm>`)."""
    from daro_lab.tracking import open_client, read_metrics, resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    client = open_client(uri)
    plan = plan or load_plan(client, parent_run_id)
    children: dict[tuple[str, int], Any] = {}
    for run in find_children(client, parent_run_id):
        key = (run.data.tags.get(TAG_ARM), int(run.data.tags.get(TAG_SEED, -1)))
        children.setdefault(key, run)
    acc_key = S.ACC_KEYS[plan.accuracy]
    wanted = (acc_key, "daro/wL/", "daro/wS/", "contrib/", "daro/weight/", "daro/at_bound", "loss/total")
    rows, frames = [], {}
    for seed in plan.seeds:
        for pa in plan.arms:
            run = children.get((pa.name, seed))
            row: dict[str, Any] = {"arm": pa.name, "label": pa.label, "method": pa.method, "seed": seed,
                                   "run_id": run.info.run_id if run else "", "status": run.info.status if run else "NOT_RUN"}
            if run is not None:
                keys = [k for k in run.data.metrics if k == acc_key or k.startswith(wanted)]
                m = read_metrics(client, run.info.run_id, keys)
                frames[(pa.name, seed)] = m
                d = pa.config["algo"]["daro"]
                row.update(S.run_stats(m, pa.method, plan.balance_window, plan.weight_stats, (d["w_min"], d["w_max"]),
                                       acc_key))
                if plan.weight_stats and run.info.status == "FAILED":
                    row["nonfinite"] = max(_nan0(row.get("nonfinite")), _failed_nonfinite(client, run.info.run_id))
            rows.append(row)
    per_seed = pd.DataFrame(rows)
    notes = []
    if isinstance(plan.target_acc, (int, float)):
        target, tdesc = float(plan.target_acc), "the grid's target_acc"
    else:
        ref = per_seed[(per_seed.arm == plan.reference) & (per_seed.status == "FINISHED")]
        vals = ref["final_acc"].dropna() if "final_acc" in ref else pd.Series(dtype=float)
        target = float(vals.mean()) if len(vals) else math.nan
        tdesc = f"the mean final accuracy of the reference arm '{plan.reference}'"
    hits = [S.steps_to_target(frames[(r.arm, r.seed)], target, acc_key) if (r.arm, r.seed) in frames and r.status == "FINISHED"
            else (math.nan, False) for r in per_seed.itertuples()]
    per_seed["steps_to_target"] = [h[0] for h in hits]
    per_seed["reached"] = [float(h[1]) for h in hits]
    for col in ("final_acc", "best_acc", "balance_cv", "balance_floor") + ((S.WEIGHT_METRICS + ("at_bound", "nonfinite"))
                                                            if plan.weight_stats else ()):
        if col not in per_seed:
            per_seed[col] = math.nan
    summary = S.summarize(per_seed, [a.name for a in plan.arms], plan.reference, plan.test, plan.weight_stats,
                          {a.name: a.label for a in plan.arms}, {a.name: a.method for a in plan.arms}, target)
    bad = per_seed[per_seed.status != "FINISHED"]
    for r in bad.itertuples():
        notes.append(f"{r.arm} seed {r.seed}: {r.status}" + (f" (run {r.run_id})" if r.run_id else "")
                     + ": left out of the means")
    if len(plan.seeds) == 1:
        notes.append("One seed: no confidence intervals and no p-values; differences between arms may be noise.")
    meta = {"name": plan.name, "description": plan.description, "parent_run_id": parent_run_id,
            "experiment": plan.experiment, "preset": plan.preset, "seeds": plan.seeds, "reference": plan.reference,
            "target_acc": target, "target_desc": tdesc, "balance_window": plan.balance_window, "test": plan.test,
            "accuracy": plan.accuracy,
            "notes": notes}
    md = S.to_markdown(summary, meta)
    summary.attrs.update({k: v for k, v in meta.items() if k != "notes"})
    if write:
        _write_summary(client, parent_run_id, summary, per_seed, md)
    status = client.get_run(parent_run_id).info.status
    return AblationResult(parent_run_id, status, summary, per_seed, md, plan, uri=uri)


def _nan0(x) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _failed_nonfinite(client, run_id: str) -> float:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, "traceback.txt", tmp)).read_text()
        return 1.0 if ("FloatingPointError" in text or "non-finite" in text) else 0.0
    except Exception:  # noqa: BLE001 - no traceback
        return 0.0


def _write_summary(client, parent_run_id: str, summary: pd.DataFrame, per_seed: pd.DataFrame, md: str) -> None:
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory(prefix="daro_ablation_") as tmp:
        for name, df in ((SUMMARY_TABLE, summary), (PER_SEED_TABLE, per_seed)):
            p = Path(tmp) / f"{name}.parquet"
            out = df.copy()
            out.attrs = {}
            out.to_parquet(p, index=False)
            client.log_artifact(parent_run_id, str(p), "tables")
        p = Path(tmp) / SUMMARY_MD
        p.write_text(md)
        client.log_artifact(parent_run_id, str(p))
    now = int(time.time() * 1000)
    metrics = []
    for r in summary.itertuples():
        for m in ("final_acc", "best_acc", "balance_cv"):
            v = getattr(r, f"{m}_mean")
            if v is not None and math.isfinite(v):
                metrics.append(Metric(f"{m}_mean/{r.arm}", float(v), now, 0))
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics, synchronous=True)
