"""Where the arms of an ablation run: one job is an arm at a seed (`ArmTask` -> `run_arm` -> `ArmResult`).

Executors: 'local' runs the jobs one after another in this process, or in a process pool of
`workers` processes when the machine has the cores (default: usable cores // the grid's num_cpus,
and one at a time for arms on a GPU); a parallel sweep warm-starts the tiny model once first;
'ray' submits each job as a Ray task with the grid's `num_cpus` and `num_gpus` (default: one GPU for
arms on trainer.device cuda) (ray.init(address) when Ray is not initialised:
`address=None` starts a local instance, 'auto' joins a running cluster).

`run_arm` never raises for a crash of its arm: the child run is FAILED (with traceback.txt) and reported.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daro_lab.ablation.grid import AblationError, Plan
from daro_lab.record import TAG_ARM, TAG_SEED

if TYPE_CHECKING:
    from daro_lab.tracking import RunStore

EXECUTORS = ("local", "ray")


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
    tr = Tracker.start(
        task.uri,
        task.experiment,
        f"{task.arm}-seed{task.seed}",
        params,
        cfg_json,
        tags=tags,
        parent_run_id=task.parent_run_id,
    )
    tr.fail(exc)
    return tr.run_id


def run_arm(task: ArmTask) -> ArmResult:
    """Train one arm at one seed as a child of the parent run; never raises for a crash of the arm
    (it is FAILED and reported), only for KeyboardInterrupt (the child is KILLED, checkpoint saved)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from daro_lab.config import config_from_dict
    from daro_lab.hooks import default_hooks
    from daro_lab.tracking import RunStore
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
            run_id = train(
                cfg,
                hooks=hooks,
                progress=task.progress,
                tracking_uri=task.uri,
                parent_run_id=task.parent_run_id,
                tags=task.tags,
            )
            action = "ran"
        return ArmResult(task.arm, task.seed, run_id, "FINISHED", action=action, seconds=time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - an arm's crash must not stop the sweep
        msg = f"{type(exc).__name__}: {exc}"
        run_id = task.resume_run_id
        try:
            if run_id is None:
                store = RunStore(task.uri)
                found = store.children(task.parent_run_id, {TAG_ARM: task.arm, TAG_SEED: str(task.seed)})
                run_id = found[0].info.run_id if found else None
                if run_id is not None and found[0].info.status == "RUNNING":
                    store.mark_failed(run_id)
            if run_id is None:  # failed before train() created the run
                run_id = _fail_child(task, exc)
        except Exception as inner:  # noqa: BLE001
            msg += f" (and recording the failure failed: {type(inner).__name__}: {inner})"
        return ArmResult(task.arm, task.seed, run_id, "FAILED", msg, seconds=time.perf_counter() - t0)


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
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise AblationError(f"workers: expected an integer >= 1 (parallel processes), got {workers!r}")
    if kind == "local":
        if workers is None:  # arms on a GPU share it: one at a time unless told otherwise
            on_gpu = any(plan.gpus(a.name) > 0 for a in plan.arms)
            workers = 1 if on_gpu else max(1, usable_cpus() // max(1, math.ceil(plan.num_cpus)))
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(plan.num_cpus, ray_address)
    raise AblationError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")


def lost_worker(store: RunStore, task: ArmTask, exc: Exception) -> ArmResult:
    """A worker died without reporting (Ray task lost, process pool broken): mark its child FAILED
    (or record a FAILED child when it died before creating one)."""
    msg = f"worker lost: {type(exc).__name__}: {exc}"
    found = store.children(task.parent_run_id, {TAG_ARM: task.arm, TAG_SEED: str(task.seed)})
    run_id = task.resume_run_id or (found[0].info.run_id if found else None)
    if run_id is not None:
        if store.run(run_id).info.status == "RUNNING":
            store.mark_failed(run_id, msg)
    else:
        run_id = _fail_child(task, RuntimeError(msg))
    return ArmResult(task.arm, task.seed, run_id, "FAILED", msg)
