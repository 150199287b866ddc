"""One training run recorded in MLflow, from config to FINISHED (or FAILED, KILLED, resumable).

Order matters for "bad input loses nothing": the tracking store is opened, a resumed run's lock taken, and
the model, data, config and checkpoint are built and loaded *before* a run is created or reopened, so a
bad path, key or checkpoint never leaves a run RUNNING or changes it.
A checkpoint only ever holds the state at a step boundary; what each interrupt does is in `daro_lab/signals.py`.
Under torchrun only rank 0 touches MLflow and writes checkpoints; evaluation is split over the ranks;
the other ranks get the run id and, on resume, the config and checkpoint from it.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daro_lab import distributed as dp
from daro_lab.config import Config, ConfigError
from daro_lab.hooks import Hook, default_hooks
from daro_lab.record import EVAL_GREEDY, REWARD_MEAN, TAG_CHECKPOINT_DIR, TAG_CHECKPOINT_STEP
from daro_lab.signals import StopSignals
from daro_lab.trainer.checkpoint import latest, resume_point, write_pointer
from daro_lab.trainer.evaluate import start_distribution
from daro_lab.trainer.lock import RunLock
from daro_lab.trainer.loop import Trainer

TAG_CKPT = TAG_CHECKPOINT_DIR  # where the run's checkpoints are (daro_lab.record)
TAG_SAVED = TAG_CHECKPOINT_STEP  # the step of the last checkpoint the run wrote: a resume that finds none refuses


def _run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.algo.method}-seed{cfg.seed}"


@dataclass
class RunEnd:
    """How train() left a run it did not finish; set as `exc.daro_lab_run` on the exception it re-raises."""

    run_id: str
    status: str  # KILLED or FAILED
    step: int | None = None  # the step boundary it stopped at, whose checkpoint is saved (None: a step was discarded)
    resume_from: str | None = None  # the checkpoint `--resume` continues from (None: from the start)


@dataclass
class _Progress:
    boundary: int | None = None  # the step whose end the trainer is at (step, evaluation, checkpoint all done)
    saved: int | None = None  # the step of the last checkpoint written


def train(
    cfg: Config | None = None,
    resume: str | None = None,
    hooks: Callable[[object], list[Hook]] = default_hooks,
    progress: bool = True,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    force: bool = False,
) -> str:
    """Train `cfg` (or continue run `resume` from its last checkpoint) and return the MLflow run id.

    A checkpoint only ever holds the state at a step boundary (`daro_lab/signals.py` says what each interrupt does);
    a resumed run continues from its last checkpoint, or from the start when it has none, and records the
    same metrics for every later step as an uninterrupted run. A run has one writer: the lock file beside
    its checkpoints (`lock.py`) refuses a second; a FINISHED run is not resumed. `force`: take over a lock
    written on another host.
    """
    from daro_lab.tracking import open_client, resolve_tracking_uri

    d = dp.init_from_env()
    uri = resolve_tracking_uri(tracking_uri or (cfg.tracking.uri if cfg else None) or None)
    lock = trainer = None
    try:
        ckpt = root = None
        if resume is not None and not str(resume).strip():
            raise ConfigError("--resume needs the id of the run to continue, got an empty string")
        if d.is_main:
            open_client(uri)  # a store that cannot be opened fails here, before anything else
            if resume is not None:
                cfg, root, lock, ckpt = _claim(uri, resume, force)
        if resume is not None:
            cfg, ckpt, root = dp.broadcast_object((cfg, ckpt, root), d)
        assert cfg is not None
        trainer = Trainer(cfg)  # model, data, engine: every bad input fails here
        try:
            if ckpt is not None:
                trainer.load(ckpt)  # a bad checkpoint fails here, before the run changes
            run_id = _tracked(trainer, d, uri, resume, ckpt, root, lock, hooks, progress, parent_run_id, tags)
        finally:
            # vLLM: free its memory now; under torchrun its distributed state too, before the process group goes
            trainer.engine.close()
    finally:
        if lock is not None:
            lock.release()
    # the model goes before the process group: DDP's reducer holds the group, and freed after it was destroyed it
    # would tear the group down itself, holding the GIL while joining gloo's worker thread, which may need the GIL
    # to free a finished collective's tensors (a deadlock seen at the end of a 2-rank run)
    trainer = None
    gc.collect()
    dp.shutdown(d)  # every rank, once all have finished (vLLM's close may have ended the group already)
    return run_id


def _claim(uri: str, run_id: str, force: bool):
    """Rank 0, before resuming `run_id`: its config and checkpoint root, and the run's lock; refuses a FINISHED
    run and a run another live process trains."""
    from daro_lab.tracking import RunStore, config_of_run

    store = RunStore(uri)
    cfg = config_of_run(store, run_id)
    run = store.run(run_id)
    if run.info.status == "FINISHED":
        raise ConfigError(
            f"run {run_id!r} is FINISHED: there is nothing to resume (its config and final checkpoint "
            "stay as they are); start a new run to train more"
        )
    tag = run.data.tags.get(TAG_CKPT)
    # the root the run recorded when it started: resuming from another directory must not move it
    root = Path(tag) if tag else Path(cfg.trainer.checkpoint_dir).resolve() / run_id
    lock = RunLock(root / "lock", run_id).acquire(force)
    try:
        ckpt = _resume_checkpoint(store, run, cfg, root)
    except BaseException:
        lock.release()
        raise
    if run.info.status == "RUNNING" and lock.previous:
        print(
            f"run {run_id} was left RUNNING by pid {lock.previous.get('pid')} on {lock.previous.get('host')}, "
            "which has ended; continuing it",
            file=sys.stderr,
        )
    return cfg, root, lock, ckpt


def _resume_checkpoint(store, run, cfg: Config, root: Path) -> Path | None:
    """The checkpoint `--resume` continues from: never a silent rewind. The newest intact one under `root` (said on
    stderr when the `latest` pointer names another); none where the run saved some: ConfigError naming where it
    looked; none because the run never saved one: None (a restart from step 0), said on stderr."""
    ckpt, note = resume_point(root)
    if note:
        print(f"run {run.info.run_id}: {note}", file=sys.stderr)
    if ckpt is not None:
        return ckpt
    saved = _saved_step(store, run, cfg)
    if saved is not None:
        raise ConfigError(
            f"run {run.info.run_id} saved checkpoints (the last at step {saved}) under {root}, but none is there "
            f"(looked for {root / 'latest'} and {root}/step_NNNNNN folders holding model.safetensors and state.pt); "
            "move the folder back (or copy a checkpoint into it) and resume again: restarting from step 0 would "
            "drop what the run recorded. The run is unchanged"
        )
    print(
        f"run {run.info.run_id} never wrote a checkpoint (none under {root}): it restarts from step 0, and what "
        "it logged is redone",
        file=sys.stderr,
    )
    return None


def _saved_step(store, run, cfg: Config) -> int | None:
    """The step of the last checkpoint the run wrote, from its tag; runs recorded before that tag: the first step
    a checkpoint was due, if the run logged a later step (the loop saves a step before it starts the next)."""
    tag = run.data.tags.get(TAG_SAVED)
    if tag is not None:
        return int(tag)
    every = cfg.trainer.checkpoint_every
    logged = store.last_step(run.info.run_id, REWARD_MEAN)
    return every if every and logged is not None and logged > every else None


def _tracked(
    trainer: Trainer,
    d,
    uri: str,
    resume: str | None,
    ckpt: Path | None,
    root: Path | None,
    lock,
    hooks,
    progress: bool,
    parent_run_id: str | None,
    tags: dict | None,
) -> str:
    """Start or reopen the MLflow run and train to the end, leaving the run FINISHED, KILLED or FAILED."""
    from daro_lab.tracking import Tracker

    cfg = trainer.cfg
    state = _Progress(boundary=trainer.step, saved=trainer.step) if ckpt is not None else _Progress()
    tracker = None  # rank 0's record of the run; other data-parallel ranks keep none
    run_id = resume
    sig = StopSignals(graceful=not d.enabled)  # under torchrun every signal stops at once: ranks are not in step
    own_lock = None
    with sig:
        try:
            with sig.deferred():  # the run is created (or reopened) whole, or not at all
                if d.is_main and resume:
                    # no checkpoint: the run starts over, and everything it logged is dropped (-1)
                    tracker = Tracker.resume(uri, resume, truncate_after_step=trainer.step if ckpt is not None else -1)
                elif d.is_main:
                    tracker = Tracker.start(
                        uri,
                        cfg.tracking.experiment,
                        _run_name(cfg),
                        cfg.flat(),
                        cfg.to_json(),
                        tags={
                            "daro_lab.method": cfg.algo.method,
                            "daro_lab.seed": cfg.seed,
                            "daro_lab.world_size": d.world_size,
                            **_dropped_tag(trainer),
                            **(tags or {}),
                        },
                        parent_run_id=parent_run_id,
                    )
                run_id = dp.broadcast_object(tracker.run_id if tracker else None, d)
                root = Path(root) if root is not None else Path(cfg.trainer.checkpoint_dir).resolve() / run_id
                if d.is_main and lock is None:  # a new run: its lock is taken here, and released below
                    lock = own_lock = RunLock(root / "lock", run_id).acquire()
                if tracker and tracker.tags().get(TAG_CKPT) != str(root):
                    tracker.set_tags({TAG_CKPT: str(root)})
            trainer.hooks = hooks(tracker) if tracker else []
            for h in trainer.hooks:
                h.on_train_start(trainer)
            if ckpt is None:
                _log_start(trainer, tracker)  # every rank: evaluation is split over them
                state.boundary = 0
                if cfg.trainer.steps > 0:
                    sig.check()
            _loop(trainer, run_id, root, progress and d.is_main, sig, state, tracker)
            if tracker and cfg.trainer.log_checkpoint:
                tracker.log_artifact(latest(root), "checkpoint")
            for h in trainer.hooks:
                h.on_train_end(trainer.step, "FINISHED")
            if tracker:
                tracker.finish("FINISHED")
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP (signals.Interrupted), or raised by code
            sig.closing = True
            saved = None
            if state.boundary is not None and state.boundary == state.saved:
                saved = state.boundary  # stopped at a boundary whose checkpoint is already written
            elif state.boundary is not None and not d.enabled and run_id:
                try:  # the trainer is at a step boundary: keep it
                    _save(trainer, root, run_id, tracker)
                    saved = state.boundary
                except Exception as err:  # noqa: BLE001 - the run must still be marked
                    print(f"could not save the checkpoint of step {state.boundary}: {err}", file=sys.stderr)
            if tracker:
                tracker.finish("KILLED")
            if run_id:
                resume_from = resume_point(root)[0] if root is not None else None
                e.daro_lab_run = RunEnd(run_id, "KILLED", saved, str(resume_from) if resume_from else None)
            raise
        except BaseException as e:
            sig.closing = True
            if tracker:
                tracker.fail(e)
                e.daro_lab_run = RunEnd(run_id, "FAILED")
            raise
        finally:
            if own_lock is not None:
                own_lock.release()
    return run_id


def _dropped_tag(trainer: Trainer) -> dict:
    """Tag daro_lab.dropped_prompts, {"train": n, "eval": n}, when task.long_prompts='drop' left prompts out."""
    return {"daro_lab.dropped_prompts": json.dumps(trainer.dropped)} if getattr(trainer, "dropped", None) else {}


def _log_start(trainer: Trainer, tracker) -> None:
    """Step 0: the starting policy's accuracy and its distribution of mu over held-out prompts.
    Every data-parallel rank calls this (the evaluation is split over them); rank 0 alone has a tracker."""
    from daro_lab.models.warmstart import warm_start_info

    trainer.evaluate()
    if tracker is None:
        return
    cfg = trainer.cfg
    info = warm_start_info(cfg.model, cfg.task, cfg.model.init_seed) if not cfg.model.path else None
    if info:
        tracker.log_dict(info, "warmstart.json")
    hist = start_distribution(trainer)
    tracker.log_metrics({f"start/prompts/{k}": v for k, v in hist.items()}, 0)
    tracker.log_table(
        "start_mu_hist",
        [{"k": int(k.split("_")[1].split("of")[0]), "K": trainer.K, "prompts": v} for k, v in hist.items()],
        0,
    )


def _save(trainer: Trainer, root: Path, run_id: str, tracker=None) -> Path | None:
    """Checkpoint the trainer at a step boundary (every data-parallel rank calls this; rank 0 writes), and tag the
    run with its step (a later resume that finds no checkpoint then knows one was written, and refuses)."""
    d = trainer.save(root / f"step_{trainer.step:06d}", {"run_id": run_id})
    if d is not None:
        write_pointer(root, d)
        if tracker is not None:
            tracker.set_tags({TAG_SAVED: trainer.step})
    return d


def _loop(
    trainer: Trainer, run_id: str, root: Path, progress: bool, sig: StopSignals, state: _Progress, tracker=None
) -> None:
    t = trainer.cfg.trainer
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=t.steps, initial=trainer.step, desc=_run_name(trainer.cfg), file=sys.stderr, dynamic_ncols=True
        )
    acc = float("nan")
    while trainer.step < t.steps:
        state.boundary = None  # from here until the step's evaluation and checkpoint are done, a stop discards it
        t0 = time.perf_counter()
        m = trainer.train_step()
        step = trainer.step
        last = step == t.steps
        if (t.eval_every and step % t.eval_every == 0) or last:  # every rank: a share of the problems each
            acc = trainer.evaluate()[0][EVAL_GREEDY]
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last:
            _save(trainer, root, run_id, tracker)
            state.saved = step
        state.boundary = step
        if bar is not None:
            bar.set_postfix(
                reward=f"{m['reward/mean']:.3f}", acc=f"{acc:.3f}", s_per_step=f"{time.perf_counter() - t0:.2f}"
            )
            bar.update(1)
        if not last:
            sig.check()  # a stop asked for during the step (the first Ctrl-C) happens here
    if bar is not None:
        bar.close()
