"""One training run recorded in MLflow, from config to FINISHED (or FAILED, KILLED, resumable).

Order matters for "bad input loses nothing": the tracking store is opened and the model, data and
config are built *before* a run is created, so a bad path or key never leaves a run RUNNING.
Under torchrun only rank 0 touches MLflow and writes checkpoints; evaluation is split over the ranks;
the other ranks get the run id and, on resume, the config and checkpoint from it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from daro_lab.config import Config, ConfigError, config_from_dict
from daro_lab.hooks import Hook, default_hooks
from daro_lab.trainer import distributed as dp
from daro_lab.trainer.checkpoint import latest, write_pointer
from daro_lab.trainer.loop import Trainer

TAG_CKPT = "daro_lab.checkpoint_dir"


def _run_name(cfg: Config) -> str:
    return cfg.tracking.run_name or f"{cfg.algo.method}-seed{cfg.seed}"


def config_of_run(uri: str, run_id: str) -> Config:
    """The resolved config a run logged (artifact config.json)."""
    from daro_lab.tracking import open_client

    client = open_client(uri)
    try:
        client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds
        raise ConfigError(f"no run {run_id!r} in tracking store {uri}") from e
    try:
        text = client.download_artifacts(run_id, "config.json")
        return config_from_dict(json.loads(Path(text).read_text()))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"run {run_id!r} has no readable config.json artifact: {e}") from e


def train(
    cfg: Config | None = None,
    resume: str | None = None,
    hooks: Callable[[object], list[Hook]] = default_hooks,
    progress: bool = True,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
) -> str:
    """Train `cfg` (or continue run `resume` from its last checkpoint) and return the MLflow run id."""
    from daro_lab.tracking import Tracker, open_client, resolve_tracking_uri

    d = dp.init_from_env()
    uri = resolve_tracking_uri(tracking_uri or (cfg.tracking.uri if cfg else None) or None)
    ckpt = None
    if d.is_main:
        open_client(uri)  # a store that cannot be opened fails here, before anything else
        if resume:
            cfg = config_of_run(uri, resume)
            client = open_client(uri)
            root = client.get_run(resume).data.tags.get(TAG_CKPT)
            ckpt = latest(root) if root else None
            if ckpt is None:
                raise ConfigError(f"run {resume!r} has no checkpoint to resume from (looked in {root})")
    if resume:
        cfg, ckpt = dp.broadcast_object((cfg, ckpt), d)
    assert cfg is not None
    trainer = Trainer(cfg)  # model, data, engine: every bad input fails here
    tracker = None  # rank 0's record of the run; other data-parallel ranks keep none
    if d.is_main and resume:
        tracker = Tracker.resume(uri, resume, truncate_after_step=int(ckpt.name.split("_")[-1]))
    elif d.is_main:
        tracker = Tracker.start(uri, cfg.tracking.experiment, _run_name(cfg), cfg.flat(), cfg.to_json(),
                                tags={"daro_lab.method": cfg.algo.method, "daro_lab.seed": cfg.seed,
                                      "daro_lab.world_size": d.world_size, **(tags or {})},
                                parent_run_id=parent_run_id)
    run_id = dp.broadcast_object(tracker.run_id if tracker else None, d)
    root = Path(cfg.trainer.checkpoint_dir).resolve() / run_id
    trainer.hooks = hooks(tracker) if tracker else []
    for h in trainer.hooks:
        h.on_train_start(trainer)
    try:
        if resume:
            trainer.load(ckpt)
        else:
            if tracker:
                tracker.set_tags({TAG_CKPT: str(root)})
            _log_start(trainer, tracker)  # every rank: evaluation is split over them
        _loop(trainer, run_id, root, progress and d.is_main)
        if tracker and cfg.trainer.log_checkpoint:
            tracker.log_artifact(latest(root), "checkpoint")
        for h in trainer.hooks:
            h.on_train_end(trainer.step, "FINISHED")
        if tracker:
            tracker.finish("FINISHED")
    except KeyboardInterrupt:
        _save(trainer, root, run_id)
        if tracker:
            tracker.finish("KILLED")
        raise
    except BaseException as e:
        if tracker:
            tracker.fail(e)
        raise
    finally:
        # vLLM: free its memory now; under torchrun its distributed state too, before the process group goes
        trainer.engine.close()
    dp.shutdown(d)  # every rank, once all have finished (vLLM's close may have ended the group already)
    return run_id


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
    hist = trainer.start_distribution()
    tracker.log_metrics({f"start/prompts/{k}": v for k, v in hist.items()}, 0)
    tracker.log_table("start_mu_hist", [{"k": int(k.split("_")[1].split("of")[0]), "K": trainer.K,
                                         "prompts": v} for k, v in hist.items()], 0)


def _save(trainer: Trainer, root: Path, run_id: str) -> Path | None:
    """Checkpoint the trainer (every data-parallel rank calls this; rank 0 writes)."""
    d = trainer.save(root / f"step_{trainer.step:06d}", {"run_id": run_id})
    if d is not None:
        write_pointer(root, d)
    return d


def _loop(trainer: Trainer, run_id: str, root: Path, progress: bool) -> None:
    t = trainer.cfg.trainer
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=trainer.step, desc=_run_name(trainer.cfg), file=sys.stderr,
                   dynamic_ncols=True)
    acc = float("nan")
    while trainer.step < t.steps:
        t0 = time.perf_counter()
        m = trainer.train_step()
        step = trainer.step
        last = step == t.steps
        if (t.eval_every and step % t.eval_every == 0) or last:  # every rank: a share of the problems each
            acc = trainer.evaluate()[0]["eval/greedy_acc"]
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last:
            _save(trainer, root, run_id)
        if bar is not None:
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{acc:.3f}", s_per_step=f"{time.perf_counter() - t0:.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
