"""Runs that already exist in a tracking store: found, read and marked through one `RunStore`.

`Tracker` writes the run in progress; `RunStore` is what the rest of daro-lab asks of the others (the
ablation scheduler's children, `--resume`, `daro-lab eval`, the TRL integration's run):

    store = RunStore("sqlite:///mlflow.db")
    store.run(run_id).info.status                # TrackingError naming the run and the store if it is not there
    store.children(parent_id, {TAG_ARM: "daro"})  # active child runs, newest first
    store.read_text(run_id, "config.json")
    store.mark_failed(run_id, "worker lost: ...")  # traceback.txt + status FAILED

Every MLflow call of daro-lab outside this package goes through `Tracker`, `RunStore` or the readers
(`read_metrics`, `read_table`), so a store's quirks (MLflow's error codes, where artifacts download to,
batch limits) are handled in one place.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daro_lab.record import TAG_PARENT
from daro_lab.tracking.mlflow_run import TrackingError, _get_run, _short, open_client, resolve_tracking_uri

MAX_BATCH = 100  # params or tags per log_batch call that every MLflow store accepts


def _quote(value: str) -> str:
    """A value in MLflow's filter syntax: in single quotes, or in double quotes when it holds a single quote."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' in value:
        raise TrackingError(f"cannot search runs by the value {value!r}: it holds both kinds of quote")
    return f'"{value}"'


class RunStore:
    """The runs of one tracking store (`uri`: a tracking URI, None for the default)."""

    def __init__(self, uri: str | None = None):
        self.uri = resolve_tracking_uri(uri)
        self.client = open_client(self.uri)  # the readers (read_metrics, read_table) accept it

    # ---- reading

    def run(self, run_id: str, what: str = "run") -> Any:
        """The run (an MLflow `Run`): TrackingError naming `what`, the id and the store when it is not there."""
        return _get_run(self.client, run_id, self.uri, what=what)

    def exists(self, run_id: str) -> bool:
        try:
            self.run(run_id)
            return True
        except TrackingError:
            return False

    def last_step(self, run_id: str, key: str) -> int | None:
        """The largest step at which the run logged metric `key` (None: never)."""
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=None)

    def children(self, parent_run_id: str, tags: Mapping[str, str] | None = None) -> list:
        """Active child runs of a parent whose tags have the given values, newest first."""
        parent = self.run(parent_run_id, what="parent run")
        f = f"tags.`{TAG_PARENT}` = {_quote(parent_run_id)}"
        for key, value in (tags or {}).items():
            f += f" and tags.`{key}` = {_quote(value)}"
        return self.client.search_runs(
            [parent.info.experiment_id], f, max_results=50000, order_by=["attributes.start_time DESC"]
        )

    def experiments(self) -> list[str]:
        """Names of the store's active experiments that hold at least one run."""
        return [
            e.name
            for e in self.client.search_experiments()
            if self.client.search_runs([e.experiment_id], max_results=1)
        ]

    def experiment_runs(self, experiment: str) -> list | None:
        """The active runs of an experiment, newest first; None when no active experiment has that name."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            return None
        return self.client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time DESC"])

    def experiment_of(self, run: Any) -> str:
        """The name of the experiment a run belongs to."""
        return self.client.get_experiment(run.info.experiment_id).name

    def artifact_paths(self, run_id: str, folder: str = "") -> set[str]:
        """Paths of the artifacts directly in `folder` of a run (e.g. {'checkpoint/model.safetensors', ...})."""
        return {a.path for a in self.client.list_artifacts(run_id, folder or None)}

    def download(self, run_id: str, path: str, into: str | Path) -> str:
        """Artifact `path` of a run copied into the local directory `into`: its local path."""
        try:
            return self.client.download_artifacts(run_id, path, str(into))
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise TrackingError(f"run {run_id!r} in {self.uri!r} has no readable artifact {path!r}: {_short(e)}") from e

    def read_text(self, run_id: str, path: str) -> str:
        """Artifact `path` of a run as text: TrackingError naming the run and the path when it cannot be read."""
        with tempfile.TemporaryDirectory(prefix="daro_artifact_") as tmp:
            return Path(self.download(run_id, path, tmp)).read_text()

    # ---- marking

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_BATCH])

    def delete_tag(self, run_id: str, key: str) -> None:
        """Remove tag `key` of a run (nothing when the run does not have it)."""
        if key in self.run(run_id).data.tags:
            self.client.delete_tag(run_id, key)

    def log_params(self, run_id: str, params: Mapping[str, Any], keep_existing: bool = True) -> None:
        """Log params the run does not have yet (MLflow refuses to change a logged param's value)."""
        from mlflow.entities import Param

        have = self.run(run_id).data.params if keep_existing else {}
        items = [Param(k, str(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, params=items[i : i + MAX_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log `metrics` at `step` now, synchronously (summary numbers on a finished parent, e.g.)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if items:
            self.client.log_batch(run_id, metrics=items, synchronous=True)

    def log_files(self, run_id: str, paths: Iterable[str | Path], folder: str | None = None) -> None:
        """Upload local files as artifacts of a run, into `folder` (None: the artifact root)."""
        for p in paths:
            self.client.log_artifact(run_id, str(p), folder)

    def mark_failed(self, run_id: str, message: str | None = None) -> None:
        """End a run as FAILED; `message` (when given) becomes its traceback.txt, as `Tracker.fail` writes it."""
        self.mark_ended(run_id, "FAILED", message)

    def mark_ended(self, run_id: str, status: str, message: str | None = None) -> None:
        """End a run as `status` (FAILED or KILLED); `message` (when given) becomes its traceback.txt."""
        if message is not None:
            self.client.log_text(run_id, message, "traceback.txt")
        self.client.set_terminated(run_id, status)

    def supersede(self, run: Any, why: str, tag: str) -> None:
        """Replace a run: tag it with `why`, end it KILLED if it still reads RUNNING, and delete it (soft:
        `mlflow runs restore` brings it back)."""
        rid = run.info.run_id
        self.client.set_tag(rid, tag, why)
        if run.info.status == "RUNNING":
            self.client.set_terminated(rid, "KILLED")
        self.client.delete_run(rid)


def config_of_run(store: RunStore | str | None, run_id: str):
    """The resolved config a run logged (artifact config.json), as a `Config`: ConfigError naming the run
    when it is not in the store or has no readable config."""
    from daro_lab.config import ConfigError, config_from_dict

    store = store if isinstance(store, RunStore) else RunStore(store)
    if not store.exists(run_id):
        raise ConfigError(f"no run {run_id!r} in tracking store {store.uri}")
    try:
        data = json.loads(store.read_text(run_id, "config.json"))
    except Exception as e:  # noqa: BLE001 - no artifact, or not JSON
        raise ConfigError(f"run {run_id!r} has no readable config.json artifact: {e}") from e
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"run {run_id!r}: its config.json is not a config of this daro-lab: {e}") from e
