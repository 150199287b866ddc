"""A thin, fast layer over `mlflow.MlflowClient`: the one place the trainer talks to MLflow.

Why not the fluent API (`mlflow.start_run`, `mlflow.log_metric`): it keeps one global active run
per process, so two runs (an ablation parent and its child, or two arms in two threads) step on
each other. Everything here goes through an explicit `MlflowClient` and an explicit run id.

What it adds over the bare client:

- the tracking URI is resolved and *opened* up front: a URI that cannot be used raises
  `TrackingError` naming it before any run exists (MLflow itself silently creates a missing
  sqlite parent directory, and retries a refused http server for minutes);
- metrics are buffered and written with `log_batch` in chunks of at most 1000 (the per-call cost of
  `log_metric` is one database transaction per value); keys are checked against the project
  convention when logged, so a bad key fails at the line that made it, not at the next flush;
- per-step tables accumulate in memory and are written as one parquet artifact per table,
  `tables/<name>.parquet`, at `flush()` / `finish()` (call `flush()` at every checkpoint);
- `resume` reopens a run after a crash and drops table rows of steps the resumed run will redo.

Metrics cannot be deleted through MLflow, so after a resume the metric history of a run holds both
the values logged before the crash and the recomputed ones for the same steps. Every resume is
recorded in the run tag `daro_lab.resumes` (JSON list of {"step", "time_ms"}); `read_metrics`
uses it to drop the stale points (step > resume step, logged before the resume) and then keeps the
last value per (key, step). Analyses should read metrics through `read_metrics`.

Infinite values: MLflow's SQL stores save +-inf as +-1.797e308 (the largest float) and return that;
`read_metrics` maps them back to +-inf. NaN round-trips as NaN.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pandas as pd

_logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# MLflow limits (mlflow/utils/validation.py in MLflow 3.x).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

TAG_PARENT_RUN_ID = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_RESUMES = "daro_lab.resumes"
TAG_NONFINITE = "daro_lab.nonfinite_metric_values"

TABLES_DIR = "tables"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# The SQL stores replace +-inf by the largest finite double (sqlalchemy_store.sanitize_metric_value).
_SQL_INF = 1.7976931348623157e308

# Project convention (docs/math.md, section 7): letters, digits, `_ - . / :` and spaces; ASCII only,
# stricter than MLflow's `\w`, which admits any Unicode letter.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-./: ]+$")


class TrackingError(RuntimeError):
    """The tracking store, run or artifact cannot be used; the message names the URI or run id."""


# --------------------------------------------------------------------------------------------
# URIs and clients


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri` if given (non-empty), else $MLFLOW_TRACKING_URI, else
    `sqlite:///mlflow.db` in the current directory, returned with an absolute path so that a
    later change of directory does not move the store."""
    if uri is not None and str(uri).strip():
        return str(uri).strip()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return "sqlite:///" + str(Path.cwd() / "mlflow.db")


def _sqlite_path(uri: str) -> str | None:
    """The database file of a `sqlite:///...` URI ('' for in-memory: sqlite://, sqlite:///, sqlite:///:memory:),
    None for other URIs."""
    if not uri.startswith("sqlite:"):
        return None
    if not uri.startswith("sqlite:///"):
        return ""  # sqlite:// (in-memory) or malformed
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    return "" if path in ("", ":memory:") else path


def open_client(uri: str | None = None) -> Any:
    """An `MlflowClient` for the resolved URI, checked by one cheap query.

    Raises `TrackingError` naming the URI when it cannot be opened: a sqlite database in a
    directory that does not exist (MLflow would silently create the directory), an unknown scheme,
    the legacy file store (refused by MLflow 3 by default), an unreachable server.
    """
    resolved = resolve_tracking_uri(uri)
    db_path = _sqlite_path(resolved)
    if db_path == "":
        raise TrackingError(
            f"cannot use tracking URI {resolved!r}: it names no database file, so the runs would live in memory "
            "and vanish when the process ends; give a file, e.g. sqlite:///mlflow.db"
        )
    if db_path:
        parent = Path(db_path).parent
        if not parent.is_dir():
            raise TrackingError(f"cannot open tracking URI {resolved!r}: directory {str(parent)!r} does not exist")
        if Path(db_path).is_dir():
            raise TrackingError(f"cannot open tracking URI {resolved!r}: {db_path!r} is a directory")
    _probe_server(resolved)
    try:
        from mlflow import MlflowClient

        # MLflow creates (migrates) a sqlite store's schema on first use; two processes doing it at once
        # fail ("duplicate column name"), so the first open is serialised by a lock file beside the database
        with _schema_lock(db_path):
            client = MlflowClient(tracking_uri=resolved)
            client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - every failure here means "cannot open this URI"
        raise TrackingError(f"cannot open tracking URI {resolved!r}: {_short(exc)}") from exc
    return client


@contextlib.contextmanager
def _schema_lock(db_path: str | None):
    """An exclusive lock on `<database>.lock` (fcntl, Linux and macOS) while a sqlite store is opened, so that its
    schema is created once when several processes start on a fresh store together. Other URIs, platforms
    without fcntl and directories where the lock file cannot be created: no lock."""
    if not db_path:
        yield
        return
    try:
        import fcntl

        fd = os.open(db_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _probe_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an http(s) server that refuses connections: MLflow's own client retries with
    back-off for minutes first. Skipped when a proxy is configured (the proxy may reach it)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise TrackingError(f"cannot open tracking URI {uri!r}: no server at {parsed.hostname}:{port} ({exc})") from exc


def _short(exc: BaseException, limit: int = 500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# Validation helpers


_OUT_OF_SPACE = ("database or disk is full", "no space left on device")


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk is full: sqlite's SQLITE_FULL ('database or
    disk is full', which MLflow wraps in SQLAlchemy's 'Query-invoked autoflush' text) or ENOSPC."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or any(t in str(exc).lower() for t in _OUT_OF_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _why(exc: BaseException) -> str:
    """A failed write, in one line: the cause when the disk is full, else the error shortened."""
    return "no space left on the store's device (database or disk is full)" if out_of_space(exc) else _short(exc)


def out_of_space_message(uri: str, run_id: str | None) -> str:
    """What a full disk under the MLflow store did, and the state the run was left in (read back: reads still work)."""
    path = _sqlite_path(uri)
    where = f"the device holding {path}" if path else f"the store {uri}"
    if path:
        try:
            where += f", {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free // 2**20} MiB free now"
        except OSError:
            pass
    msg = f"the MLflow store {uri} is out of space (no space left on {where}; sqlite: database or disk is full)"
    if run_id is None:
        return msg + "; no run was created"
    try:
        status = open_client(uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - the message is what matters here
        status = "unknown"
    marked = "could not be marked FAILED and still reads RUNNING" if status == "RUNNING" else f"is marked {status}"
    return (
        f"{msg}: run {run_id} {marked}; the metrics of its last steps may be missing. Free space on that device, "
        f"then --resume {run_id} continues it from its last checkpoint"
    )


@functools.lru_cache(maxsize=8192)  # the same keys every step: check each once (errors are not cached)
def validate_key(key: str, what: str = "metric key") -> str:
    """Return `key` if it follows the convention, else raise ValueError naming it.

    Allowed: ASCII letters, digits, `_ - . / :` and spaces, at most 250 characters, and no part
    that a path would normalise away (`a//b`, `a/`, `/a`, `./a`, `a/../b`), as MLflow also requires.
    """
    if not isinstance(key, str):
        raise ValueError(f"invalid {what} {key!r}: must be a str, got {type(key).__name__}")
    if not key or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid {what} {key!r}: use only letters, digits, '_', '-', '.', '/', ':' and spaces "
            "(e.g. 'loss/mu_3of8', never 'mu=3/8')"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid {what} {key!r}: longer than {MAX_KEY_LENGTH} characters")
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        raise ValueError(f"invalid {what} {key!r}: would be read as the path {norm!r}")
    return key


def _validate_table_name(name: str) -> str:
    validate_key(name, "table name")
    if " " in name or ":" in name or any(part.startswith(".") for part in name.split("/")):
        raise ValueError(
            f"invalid table name {name!r}: use letters, digits, '_', '-', '.', '/' "
            "(no spaces or ':', no part starting with '.')"
        )
    return name


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _truncate(value: Any, limit: int, what: str, key: str) -> str:
    text = str(value)
    if len(text) > limit:
        _logger.warning("%s %r is %d characters; truncated to %d", what, key, len(text), limit)
        text = text[:limit]
    return text


def _chunks(seq: list, size: int) -> Iterable[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_status(status: str) -> str:
    up = str(status).upper()
    if up not in RUN_STATUSES:
        raise ValueError(f"invalid run status {status!r}: use one of {', '.join(RUN_STATUSES)}")
    return up


# --------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """One MLflow run, opened by `Tracker.start` or `Tracker.resume`; thread-safe.

    Use as a context manager: normal exit finishes the run (FINISHED), an exception marks it
    FAILED with `traceback.txt`, KeyboardInterrupt marks it KILLED; exceptions are re-raised.

    Metrics are buffered: they reach MLflow at `flush()`, at `finish()`, when
    `max_buffered_metrics` are waiting, or when `flush_interval_s` has passed since the last write
    (checked on each `log_metrics`). Tables reach MLflow at `flush()` and `finish()` only.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        tracking_uri: str,
        *,
        max_buffered_metrics: int = 5000,
        flush_interval_s: float = 30.0,
    ) -> None:
        """Wrap an existing run; use `start` or `resume` rather than calling this directly."""
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.max_buffered_metrics = int(max_buffered_metrics)
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.RLock()
        self._metrics: list[tuple[str, float, int, int]] = []  # key, value, timestamp_ms, step
        self._last_flush = time.monotonic()
        self._tables_base: dict[str, pd.DataFrame] = {}  # what is (or will be) in the artifact
        self._tables_new: dict[str, list[Any]] = {}  # chunks since: list[dict] or DataFrame
        self._tables_dirty: set[str] = set()
        self._finished = False
        self._traceback_written = False
        self.status: str | None = "RUNNING"
        self.nonfinite_counts: Counter[str] = Counter()
        self.metrics_logged = 0

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        uri: str | None,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        config_json: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        *,
        artifact_location: str | None = None,
        context_tags: bool = True,
        max_buffered_metrics: int = 5000,
        flush_interval_s: float = 30.0,
    ) -> Tracker:
        """Create a run in `experiment` (created if missing) and log its params, config and tags.

        params: nested mappings are flattened with '.'; values are str()-ed and cut to 6000
            characters (the full config is in the `config.json` artifact); logged 100 per batch.
        config_json: the resolved config, a JSON string; logged as artifact `config.json`.
        tags: extra run tags (values cut to 8000 characters).
        parent_run_id: makes this a nested run (tag `mlflow.parentRunId`), e.g. an ablation arm.
        artifact_location: where a *newly created* experiment stores artifacts; None uses
            MLflow's default (`./mlruns/<experiment id>` of the directory the store was first
            opened from). Ignored for an existing experiment.
        context_tags: add MLflow's context tags (user, source file, git commit when available).

        Everything is validated before the run is created, so bad input leaves no run behind.
        """
        flat = _flatten(params or {})
        param_list = []
        for key, value in flat.items():
            validate_key(key, "param key")
            param_list.append((key, _truncate(value, MAX_PARAM_VAL_LENGTH, "param", key)))
        tag_map: dict[str, str] = {}
        for key, value in (tags or {}).items():
            validate_key(key, "tag key")
            tag_map[key] = _truncate(value, MAX_TAG_VAL_LENGTH, "tag", key)
        if not isinstance(config_json, str):
            raise ValueError(f"config_json must be a JSON string, got {type(config_json).__name__}")
        try:
            json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config_json is not valid JSON: {exc}") from exc
        if not experiment or not str(experiment).strip():
            raise ValueError("experiment name must be non-empty")

        client = open_client(uri)
        resolved = client.tracking_uri
        if parent_run_id:
            parent = _get_run(client, parent_run_id, resolved, what="parent run")
            if parent.info.lifecycle_stage != "active":
                raise TrackingError(f"parent run {parent_run_id!r} in {resolved!r} is deleted")
        exp_id = _get_or_create_experiment(client, experiment, artifact_location, resolved)

        create_tags: dict[str, str] = {}
        if context_tags:
            try:
                from mlflow.tracking.context.registry import resolve_tags

                create_tags.update({k: str(v) for k, v in resolve_tags({}).items()})
            except Exception as exc:  # noqa: BLE001 - context tags are a nicety
                _logger.debug("MLflow context tags unavailable: %s", exc)
        if parent_run_id:
            create_tags[TAG_PARENT_RUN_ID] = parent_run_id
        try:
            run = client.create_run(exp_id, run_name=run_name or None, tags=create_tags)
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(
                f"cannot create a run in experiment {experiment!r} of {resolved!r}: {_short(exc)}"
            ) from exc
        tracker = cls(
            client,
            run.info.run_id,
            resolved,
            max_buffered_metrics=max_buffered_metrics,
            flush_interval_s=flush_interval_s,
        )
        try:
            from mlflow.entities import Param, RunTag

            for chunk in _chunks(param_list, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(tracker.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
            for chunk in _chunks(list(tag_map.items()), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(tracker.run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)
            client.log_text(tracker.run_id, config_json, "config.json")
        except Exception as exc:  # noqa: BLE001
            tracker._terminate_quietly("FAILED", exc)
            raise TrackingError(
                f"cannot record params/config of run {tracker.run_id!r} in {resolved!r}: {_short(exc)}"
            ) from exc
        return tracker

    @classmethod
    def resume(
        cls,
        uri: str | None,
        run_id: str,
        truncate_after_step: int | None = None,
        *,
        max_buffered_metrics: int = 5000,
        flush_interval_s: float = 30.0,
    ) -> Tracker:
        """Reopen an existing run (status back to RUNNING) to continue logging into it.

        The run's tables are read back so that new rows append to them. With
        `truncate_after_step=N` (the step of the checkpoint resumed from), table rows with
        step > N are dropped and the tables rewritten at once; metrics cannot be deleted in
        MLflow, so the resume is recorded in tag `daro_lab.resumes` and `read_metrics` drops the
        stale points. Unknown or deleted run id: `TrackingError` naming it.

        MLflow keeps the end time of the earlier termination until the run is finished again.
        """
        if truncate_after_step is not None:
            truncate_after_step = int(truncate_after_step)
        client = open_client(uri)
        resolved = client.tracking_uri
        run = _get_run(client, run_id, resolved, what="run")
        if run.info.lifecycle_stage != "active":
            raise TrackingError(f"run {run_id!r} in {resolved!r} is deleted; restore it first")
        tracker = cls(
            client,
            run.info.run_id,
            resolved,
            max_buffered_metrics=max_buffered_metrics,
            flush_interval_s=flush_interval_s,
        )
        try:
            resumes = json.loads(run.data.tags.get(TAG_RESUMES, "[]"))
            if not isinstance(resumes, list):
                resumes = []
        except json.JSONDecodeError:
            resumes = []
        resumes.append({"step": truncate_after_step, "time_ms": _now_ms()})
        text = json.dumps(resumes, separators=(",", ":"))
        while len(text) > MAX_TAG_VAL_LENGTH and len(resumes) > 1:  # keep the most recent
            resumes.pop(0)
            text = json.dumps(resumes, separators=(",", ":"))
        try:
            client.update_run(tracker.run_id, status="RUNNING")
            client.set_tag(tracker.run_id, TAG_RESUMES, text)
            tracker._load_tables(truncate_after_step)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(f"cannot resume run {run_id!r} in {resolved!r}: {_short(exc)}") from exc
        return tracker

    # ---- properties ------------------------------------------------------------------------

    @property
    def artifact_uri(self) -> str:
        """The run's artifact root URI."""
        return self.client.get_run(self.run_id).info.artifact_uri

    def artifact_dir(self) -> Path | None:
        """The run's artifact directory on this machine, or None when artifacts are remote."""
        return _local_path(self.artifact_uri)

    @property
    def nonfinite_count(self) -> int:
        """How many NaN/inf metric values were logged (they are kept, as MLflow allows)."""
        return sum(self.nonfinite_counts.values())

    @property
    def finished(self) -> bool:
        return self._finished

    # ---- logging ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Buffer `metrics` at `step`; keys are checked now (ValueError naming the key).

        Values are converted with float() (numpy scalars and 0-d tensors work); NaN and +-inf are
        kept and counted in `nonfinite_counts`.
        """
        step = _as_step(step)
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        rows = []
        bad = []
        for key, value in metrics.items():
            validate_key(key, "metric key")
            if value is None or isinstance(value, (str, bytes)):
                raise ValueError(f"metric {key!r} has non-numeric value {value!r}")
            try:
                fval = float(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metric {key!r} has non-numeric value {value!r}") from exc
            if not math.isfinite(fval):
                bad.append(key)
            rows.append((key, fval, ts, step))
        with self._lock:
            self._check_open()
            self._metrics.extend(rows)
            self.metrics_logged += len(rows)
            self.nonfinite_counts.update(bad)
            due = len(self._metrics) >= self.max_buffered_metrics or (
                time.monotonic() - self._last_flush >= self.flush_interval_s
            )
            if due:
                self._flush_metrics()

    def log_metric(self, key: str, value: float, step: int) -> None:
        """One metric; buffered like `log_metrics`."""
        self.log_metrics({key: value}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """More params (MLflow refuses to change the value of a param already logged)."""
        from mlflow.entities import Param

        items = [
            (validate_key(k, "param key"), _truncate(v, MAX_PARAM_VAL_LENGTH, "param", k))
            for k, v in _flatten(params).items()
        ]
        with self._lock:
            self._check_open()
            for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)

    def tags(self) -> dict[str, str]:
        """The run's tags as the store holds them now."""
        return dict(_get_run(self.client, self.run_id, self.tracking_uri).data.tags)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags now (values cut to 8000 characters)."""
        from mlflow.entities import RunTag

        items = [(validate_key(k, "tag key"), _truncate(v, MAX_TAG_VAL_LENGTH, "tag", k)) for k, v in tags.items()]
        with self._lock:
            self._check_open()
            for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)

    def log_table(self, name: str, rows: list[dict] | pd.DataFrame, step: int | None = None) -> None:
        """Append rows to table `name`, written as artifact `tables/<name>.parquet` at flush.

        With `step`, a `step` column is set on every row (a row carrying a different `step`
        is an error); without it, rows keep their own `step` column if any. Rows without a `step`
        column are never dropped by `resume(truncate_after_step=...)`.
        """
        _validate_table_name(name)
        if step is not None:
            step = _as_step(step)
        if isinstance(rows, pd.DataFrame):
            chunk: Any = rows.copy()
            if step is not None:
                if "step" in chunk.columns and not (chunk["step"] == step).all():
                    raise ValueError(f"table {name!r}: rows carry steps other than step={step}")
                if "step" in chunk.columns:
                    chunk["step"] = step
                else:
                    chunk.insert(0, "step", step)
            if len(chunk) == 0:
                return
        else:
            chunk = []
            for row in rows:
                if not isinstance(row, Mapping):
                    raise ValueError(f"table {name!r}: rows must be dicts, got {type(row).__name__}")
                if step is not None:
                    if "step" in row and row["step"] != step:
                        raise ValueError(f"table {name!r}: row has step={row['step']!r}, logged with step={step}")
                    r = {"step": step}
                    r.update(row)
                    r["step"] = step
                else:
                    r = dict(row)
                chunk.append(r)
            if not chunk:
                return
        with self._lock:
            self._check_open()
            self._tables_new.setdefault(name, []).append(chunk)
            self._tables_dirty.add(name)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` as artifact `artifact_file` (e.g. 'samples/step_10.txt') now."""
        self._check_open()
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Write a dict as a JSON (or .yaml/.yml) artifact now."""
        self._check_open()
        self.client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file, or a directory's contents, into the run's artifacts (under `artifact_path`)."""
        self._check_open()
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"artifact to log does not exist: {os.fspath(local_path)!r}")
        if os.path.isdir(local_path):
            self.client.log_artifacts(self.run_id, os.fspath(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, os.fspath(local_path), artifact_path)

    # ---- flushing and ending ---------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metrics and every changed table. Call it at each checkpoint."""
        with self._lock:
            self._check_open()
            self._flush_all()

    def table(self, name: str) -> pd.DataFrame:
        """The whole table `name` as it stands in memory (written rows plus pending ones)."""
        with self._lock:
            return self._materialise(name)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush everything, then mark the run terminated with `status` (FINISHED, FAILED or
        KILLED). A second call does nothing. If the final flush fails, the run is marked FAILED
        (traceback in `traceback.txt`) and the error re-raised."""
        status = _check_status(status)
        with self._lock:
            if self._finished:
                return
            try:
                self._flush_all()
            except BaseException as exc:
                self._terminate_quietly("FAILED", exc)
                raise
            self._set_terminated(status)

    def fail(self, exc: BaseException) -> None:
        """Write the traceback of `exc` as artifact `traceback.txt`, then finish('FAILED').

        Meant for error paths (`except BaseException as e: tracker.fail(e); raise`), so it never
        raises an Exception of its own: a failure to flush or close is logged, not raised, so that
        it cannot mask `exc`."""
        with self._lock:
            if self._finished:
                return
            self._write_traceback(exc)
            try:
                self.finish("FAILED")
            except Exception as inner:  # noqa: BLE001
                _logger.error("could not flush/close MLflow run %s: %s", self.run_id, _why(inner))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            self.finish("FINISHED")
            return False
        try:
            if isinstance(exc, KeyboardInterrupt):
                self.finish("KILLED")
            elif isinstance(exc, SystemExit) and exc.code in (None, 0):
                self.finish("FINISHED")
            else:
                self.fail(exc)
        except Exception as inner:  # noqa: BLE001 - never mask the exception that got us here
            _logger.error("could not close MLflow run %s: %s", self.run_id, _why(inner))
        return False

    # ---- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise TrackingError(f"run {self.run_id!r} is finished ({self.status}); resume it to log more")

    def _flush_all(self) -> None:
        self._flush_metrics()
        self._flush_tables()
        if self.nonfinite_counts:
            self.client.set_tag(self.run_id, TAG_NONFINITE, str(self.nonfinite_count))

    def _flush_metrics(self) -> None:
        if not self._metrics:
            self._last_flush = time.monotonic()
            return
        from mlflow.entities import Metric

        pending = self._metrics
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            batch = [Metric(k, v, ts, s) for k, v, ts, s in pending[i : i + MAX_METRICS_PER_BATCH]]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception:
                self._metrics = pending[i:]  # keep what was not written, for a retry
                raise
        self._metrics = []
        self._last_flush = time.monotonic()

    def _materialise(self, name: str) -> pd.DataFrame:
        parts: list[pd.DataFrame] = []
        base = self._tables_base.get(name)
        if base is not None:
            parts.append(base)
        records: list[dict] = []
        for chunk in self._tables_new.get(name, []):
            if isinstance(chunk, pd.DataFrame):
                if records:
                    parts.append(pd.DataFrame.from_records(records))
                    records = []
                parts.append(chunk)
            else:
                records.extend(chunk)
        if records:
            parts.append(pd.DataFrame.from_records(records))
        parts = [p for p in parts if len(p.columns)]
        if not parts:
            return pd.DataFrame()
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True, sort=False)

    def _flush_tables(self) -> None:
        for name in sorted(self._tables_dirty):
            df = self._materialise(name)
            self._write_table(name, df)
            self._tables_base[name] = df
            self._tables_new.pop(name, None)
            self._tables_dirty.discard(name)

    def _write_table(self, name: str, df: pd.DataFrame) -> None:
        artifact_file = f"{TABLES_DIR}/{name}.parquet"
        sub = posixpath.dirname(artifact_file)
        with tempfile.TemporaryDirectory(prefix="daro_table_") as tmp:
            path = os.path.join(tmp, posixpath.basename(artifact_file))
            try:
                df.to_parquet(path, index=False)
            except Exception as exc:  # noqa: BLE001 - usually mixed types in one column
                raise TrackingError(
                    f"cannot write table {name!r} of run {self.run_id!r} as parquet: {_short(exc)}"
                ) from exc
            self.client.log_artifact(self.run_id, path, sub)

    def _load_tables(self, truncate_after_step: int | None) -> None:
        names = list_tables(self.client, self.run_id)
        if not names:
            return
        artifact_uri = self.artifact_uri
        with tempfile.TemporaryDirectory(prefix="daro_tables_") as tmp:
            for name in names:
                local = _fetch_artifact(self.client, self.run_id, f"{TABLES_DIR}/{name}.parquet", tmp, artifact_uri)
                df = pd.read_parquet(local)
                if truncate_after_step is not None and "step" in df.columns:
                    keep = ~(df["step"] > truncate_after_step)
                    if not keep.all():
                        df = df[keep].reset_index(drop=True)
                        self._tables_dirty.add(name)
                self._tables_base[name] = df
        if self._tables_dirty:
            self._flush_tables()

    def _write_traceback(self, exc: BaseException) -> None:
        # The first error owns traceback.txt; an error while closing after it goes beside it.
        name = "close_traceback.txt" if self._traceback_written else "traceback.txt"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.client.log_text(self.run_id, text, name)
            self._traceback_written = True
        except Exception as inner:  # noqa: BLE001
            _logger.error("could not write %s for run %s: %s", name, self.run_id, _why(inner))

    def _set_terminated(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
        self._finished = True
        self.status = status

    def _terminate_quietly(self, status: str, exc: BaseException) -> None:
        self._write_traceback(exc)
        try:
            self._set_terminated(status)
        except Exception as inner:  # noqa: BLE001
            _logger.error("could not mark run %s %s: %s", self.run_id, status, _why(inner))
            self._finished = True
            self.status = status


def _as_step(step: Any) -> int:
    """An int step; integral floats (3.0) pass, bools and 3.5 do not."""
    if isinstance(step, bool):
        raise ValueError(f"step must be an int, got {step!r}")
    if hasattr(step, "__index__"):
        return int(step.__index__())
    try:
        fstep = float(step)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"step must be an int, got {step!r}") from exc
    if not fstep.is_integer():
        raise ValueError(f"step must be an int, got {step!r}")
    return int(fstep)


def _get_run(client: Any, run_id: str, uri: str, what: str = "run") -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id or not isinstance(run_id, str):
        raise TrackingError(f"{what} id {run_id!r} is not a run id")
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(f"{what} {run_id!r} not found in {uri!r}") from exc
        raise TrackingError(f"cannot read {what} {run_id!r} from {uri!r}: {_short(exc)}") from exc


def _get_or_create_experiment(client: Any, name: str, artifact_location: str | None, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another process created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"cannot create experiment {name!r} in {uri!r}: {_short(exc)}") from exc
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} in {uri!r} is deleted; restore it (mlflow experiments restore) or use another name"
        )
    return exp.experiment_id


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


# --------------------------------------------------------------------------------------------
# Reading back (for analyses)


def _fetch_artifact(client: Any, run_id: str, path: str, tmp: str, artifact_uri: str | None = None) -> str:
    """A local file holding artifact `path` of the run: read in place when the artifact store is
    on this machine (no copy, and none of MLflow's tqdm download bar), else downloaded to `tmp`."""
    if artifact_uri is None:
        artifact_uri = client.get_run(run_id).info.artifact_uri
    local = _local_path(artifact_uri)
    if local is not None:
        target = local / path
        if not target.is_file():
            raise FileNotFoundError(f"run {run_id!r} has no artifact {path!r}")
        return str(target)
    return client.download_artifacts(run_id, path, tmp)


def _client_for(uri_or_client: Any) -> Any:
    if uri_or_client is None or isinstance(uri_or_client, str):
        return open_client(uri_or_client)
    return uri_or_client


def list_tables(uri: Any, run_id: str) -> list[str]:
    """Names of the tables of a run (`uri` may also be an MlflowClient)."""
    client = _client_for(uri)
    names: list[str] = []

    def walk(path: str) -> None:
        for info in client.list_artifacts(run_id, path):
            if info.is_dir:
                walk(info.path)
            elif info.path.endswith(".parquet"):
                names.append(info.path[len(TABLES_DIR) + 1 : -len(".parquet")])

    walk(TABLES_DIR)
    return sorted(names)


def read_table(uri: Any, run_id: str, name: str) -> pd.DataFrame:
    """Table `name` of a run, from artifact `tables/<name>.parquet` (`uri` may be an MlflowClient).

    Unknown table: `TrackingError` naming it and the tables the run has."""
    _validate_table_name(name)
    client = _client_for(uri)
    run = _get_run(client, run_id, getattr(client, "tracking_uri", str(uri)))
    with tempfile.TemporaryDirectory(prefix="daro_read_") as tmp:
        try:
            local = _fetch_artifact(client, run_id, f"{TABLES_DIR}/{name}.parquet", tmp, run.info.artifact_uri)
        except Exception as exc:  # noqa: BLE001
            have = list_tables(client, run_id)
            raise TrackingError(f"run {run_id!r} has no table {name!r} (tables: {', '.join(have) or 'none'})") from exc
        return pd.read_parquet(local)


def read_metrics(
    uri: Any, run_id: str, keys: Iterable[str] | None = None, *, apply_resumes: bool = True
) -> pd.DataFrame:
    """A run's metric history in long format: columns key, step, value, timestamp (ms).

    One row per (key, step): the last value logged (by timestamp). With `apply_resumes`, points
    made stale by a `Tracker.resume(truncate_after_step=N)` (step > N and logged before that
    resume) are dropped first. +-1.797e308 (how SQL stores keep +-inf) is mapped back to +-inf.
    `uri` may also be an MlflowClient.
    """
    client = _client_for(uri)
    run = _get_run(client, run_id, getattr(client, "tracking_uri", str(uri)))
    key_list = sorted(run.data.metrics) if keys is None else list(keys)
    frames = []
    for key in key_list:
        hist = client.get_metric_history(run_id, key)
        if hist:
            frames.append(
                pd.DataFrame(
                    {
                        "key": key,
                        "step": [m.step for m in hist],
                        "value": [m.value for m in hist],
                        "timestamp": [m.timestamp for m in hist],
                    }
                )
            )
    if not frames:
        return pd.DataFrame(
            {
                "key": pd.Series(dtype=object),
                "step": pd.Series(dtype="int64"),
                "value": pd.Series(dtype="float64"),
                "timestamp": pd.Series(dtype="int64"),
            }
        )
    df = pd.concat(frames, ignore_index=True)
    df["value"] = df["value"].astype("float64")
    df.loc[df["value"] >= _SQL_INF, "value"] = math.inf
    df.loc[df["value"] <= -_SQL_INF, "value"] = -math.inf
    if apply_resumes:
        try:
            resumes = json.loads(run.data.tags.get(TAG_RESUMES, "[]"))
        except json.JSONDecodeError:
            resumes = []
        for r in resumes if isinstance(resumes, list) else []:
            if isinstance(r, dict) and r.get("step") is not None and r.get("time_ms") is not None:
                stale = (df["step"] > int(r["step"])) & (df["timestamp"] < int(r["time_ms"]))
                df = df[~stale]
    df = df.sort_values(["key", "step", "timestamp"], kind="stable")
    df = df.drop_duplicates(["key", "step"], keep="last")
    return df.reset_index(drop=True)
