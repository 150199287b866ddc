"""Tests of daro_lab.tracking: a Tracker over MlflowClient on a temporary sqlite store.

Creating a fresh MLflow sqlite database runs all its migrations (seconds), so one migrated
template database is made per session and copied for each test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import pandas as pd
import pytest

from daro_lab.tracking import (
    TAG_PARENT_RUN_ID,
    Tracker,
    TrackingError,
    list_tables,
    open_client,
    read_metrics,
    read_table,
    resolve_tracking_uri,
)

CONFIG = json.dumps({"trainer": {"lr": 1e-6}, "algo": {"method": "daro"}})


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    open_client(f"sqlite:///{path}")  # runs MLflow's migrations once
    return path


@pytest.fixture
def store(tmp_path, template_db, monkeypatch):
    """(tracking uri, artifact location) of a fresh store for this test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}", str(tmp_path / "artifacts")


def start(store, run_name="run", params=None, **kw):
    uri, art = store
    return Tracker.start(
        uri,
        kw.pop("experiment", "exp"),
        run_name,
        params if params is not None else {"trainer.lr": 1e-6},
        kw.pop("config_json", CONFIG),
        kw.pop("tags", None),
        artifact_location=art,
        context_tags=False,
        **kw,
    )


def status(store, run_id):
    return open_client(store[0]).get_run(run_id).info.status


def artifact_text(store, run_id, path, tmp_path):
    local = open_client(store[0]).download_artifacts(run_id, path, str(tmp_path))
    with open(local) as f:
        return f.read()


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("") == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_params_config_and_tags_logged(store, tmp_path):
    params = {f"p.{i:03d}": i for i in range(150)}  # more than one batch of 100
    params["nested"] = {"a": 1, "b": {"c": "x"}}
    params["long"] = "y" * 7000
    with start(store, "arm-a", params, tags={"method": "daro", "seed": 3}) as tr:
        run_id = tr.run_id
        assert status(store, run_id) == "RUNNING"
        tr.log_params({"late": {"param": 2}})
        tr.set_tags({"note": "hello"})
    run = open_client(store[0]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "arm-a"
    assert run.data.params["p.149"] == "149"
    assert run.data.params["nested.a"] == "1" and run.data.params["nested.b.c"] == "x"
    assert run.data.params["long"] == "y" * 6000
    assert len(run.data.params) == 154 and run.data.params["late.param"] == "2"
    assert run.data.tags["method"] == "daro" and run.data.tags["seed"] == "3"
    assert run.data.tags["note"] == "hello"
    assert json.loads(artifact_text(store, run_id, "config.json", tmp_path)) == json.loads(CONFIG)
    assert tr.artifact_dir() is not None and (tr.artifact_dir() / "config.json").is_file()


def test_bad_input_creates_no_run(store):
    with pytest.raises(ValueError, match="mu=3/8"):
        start(store, params={"mu=3/8": 1})
    with pytest.raises(ValueError, match="JSON"):
        start(store, config_json="{not json")
    client = open_client(store[0])
    exp = client.get_experiment_by_name("exp")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_metrics_by_step_read_back(store):
    with start(store, max_buffered_metrics=10**9, flush_interval_s=1e9) as tr:
        for step in range(3):
            tr.log_metrics({f"m/{i}": step * 1000 + i for i in range(600)}, step=step)
        tr.log_metrics({"loss/mu_3of8": float("nan"), "w/mu_1of8": float("inf")}, step=3)
        tr.log_metric("w/mu_1of8", -math.inf, step=4)
        client = open_client(store[0])
        assert client.get_metric_history(tr.run_id, "m/0") == []  # still buffered
        tr.flush()  # 1803 metrics: two log_batch calls
        assert len(client.get_metric_history(tr.run_id, "m/0")) == 3
    assert tr.nonfinite_count == 3 and tr.nonfinite_counts["w/mu_1of8"] == 2
    df = read_metrics(store[0], tr.run_id)
    assert list(df.columns) == ["key", "step", "value", "timestamp"]
    m = df.set_index(["key", "step"])["value"]
    assert len(df) == 1803
    assert m[("m/599", 2)] == 2599
    assert math.isnan(m[("loss/mu_3of8", 3)])
    assert m[("w/mu_1of8", 3)] == math.inf and m[("w/mu_1of8", 4)] == -math.inf
    assert len(read_metrics(store[0], tr.run_id, keys=["m/1"])) == 3


def test_metrics_flush_automatically(store):
    tr = start(store, max_buffered_metrics=50, flush_interval_s=1e9)
    client = open_client(store[0])
    for step in range(4):
        tr.log_metrics({f"a/{i}": float(i) for i in range(20)}, step=step)
    assert len(client.get_metric_history(tr.run_id, "a/0")) == 3  # flushed at 60 buffered
    tr.finish()
    assert len(client.get_metric_history(tr.run_id, "a/0")) == 4


def test_bad_metric_key_rejected(store):
    with start(store) as tr:
        for bad in ["mu=3/8", "a//b", "loss/", "/x", "é", ""]:
            with pytest.raises(ValueError) as err:
                tr.log_metrics({"ok": 1.0, bad: 1.0}, step=0)
            assert repr(bad) in str(err.value)
        with pytest.raises(ValueError, match="step"):
            tr.log_metrics({"ok": 1.0}, step=1.5)
        tr.log_metrics({"loss/mu_3of8": 1.0, "time: rollout s": 2.0, "a-b.c_d": 3.0}, step=0)
    keys = set(read_metrics(store[0], tr.run_id)["key"])
    assert keys == {"loss/mu_3of8", "time: rollout s", "a-b.c_d"}  # nothing of the bad calls


def test_table_parquet_round_trip(store):
    with start(store) as tr:
        tr.log_table("per_mu", [{"k": k, "L": 0.1 * k} for k in range(1, 4)], step=0)
        tr.log_table("per_mu", pd.DataFrame({"k": [1, 2], "L": [0.5, 0.6]}), step=1)
        tr.log_table("hoeffding/coverage", [{"step": 2, "n": 8, "covered": True}])
        tr.flush()
        assert len(read_table(store[0], tr.run_id, "per_mu")) == 5
        tr.log_table("per_mu", [{"k": 3, "L": 0.7}], step=2)
    df = read_table(store[0], tr.run_id, "per_mu")
    assert list(df.columns) == ["step", "k", "L"]
    assert df["step"].tolist() == [0, 0, 0, 1, 1, 2]
    assert df["L"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.6, 0.7])
    assert read_table(store[0], tr.run_id, "hoeffding/coverage")["covered"].tolist() == [True]
    assert list_tables(store[0], tr.run_id) == ["hoeffding/coverage", "per_mu"]
    with pytest.raises(TrackingError, match="nope"):
        read_table(store[0], tr.run_id, "nope")


def test_resume_truncates_tables_and_stale_metrics(store):
    old = int(time.time() * 1000) - 60_000  # the crashed run logged a minute ago
    tr = start(store)
    for step in range(1, 6):
        tr.log_metrics({"loss": float(step)}, step=step, timestamp_ms=old + step)
        tr.log_table("per_mu", [{"k": 1, "L": float(step)}], step=step)
    tr.flush()
    run_id = tr.run_id  # the process "crashes" here: no finish, run stays RUNNING

    with pytest.raises(TrackingError, match="0123456789abcdef0123456789abcdef"):
        Tracker.resume(store[0], "0123456789abcdef0123456789abcdef")

    tr2 = Tracker.resume(store[0], run_id, truncate_after_step=3)
    assert read_table(store[0], run_id, "per_mu")["step"].tolist() == [1, 2, 3]  # rewritten at once
    tr2.log_metrics({"loss": 40.0}, step=4)
    tr2.log_table("per_mu", [{"k": 1, "L": 40.0}], step=4)
    tr2.finish()
    assert status(store, run_id) == "FINISHED"

    df = read_table(store[0], run_id, "per_mu")
    assert df["step"].tolist() == [1, 2, 3, 4] and df["L"].tolist() == [1.0, 2.0, 3.0, 40.0]
    m = read_metrics(store[0], run_id)
    assert m["step"].tolist() == [1, 2, 3, 4] and m["value"].tolist() == [1.0, 2.0, 3.0, 40.0]
    raw = read_metrics(store[0], run_id, apply_resumes=False)  # MLflow still holds the old points
    assert raw["step"].tolist() == [1, 2, 3, 4, 5] and raw["value"].tolist()[3:] == [40.0, 5.0]

    tr3 = Tracker.resume(store[0], run_id)  # a resume of a finished run, no truncation
    assert status(store, run_id) == "RUNNING"
    tr3.log_table("per_mu", [{"k": 2, "L": 5.0}], step=5)
    tr3.finish()
    assert read_table(store[0], run_id, "per_mu")["step"].tolist() == [1, 2, 3, 4, 5]


def test_context_manager_marks_failed_with_traceback(store, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with start(store) as tr:
            tr.log_metrics({"loss": 1.0}, step=0)
            tr.log_table("t", [{"a": 1}], step=0)
            raise RuntimeError("boom")
    assert status(store, tr.run_id) == "FAILED"
    text = artifact_text(store, tr.run_id, "traceback.txt", tmp_path)
    assert "RuntimeError: boom" in text and "Traceback" in text
    assert read_metrics(store[0], tr.run_id)["value"].tolist() == [1.0]  # flushed before failing
    assert len(read_table(store[0], tr.run_id, "t")) == 1
    with pytest.raises(TrackingError, match="finished"):
        tr.log_metrics({"loss": 2.0}, step=1)
    tr.finish()  # a second finish does nothing
    assert status(store, tr.run_id) == "FAILED"


def test_context_manager_marks_killed_on_keyboard_interrupt(store):
    with pytest.raises(KeyboardInterrupt):
        with start(store) as tr:
            raise KeyboardInterrupt
    assert status(store, tr.run_id) == "KILLED"


def test_fail_and_finish_status(store):
    tr = start(store)
    with pytest.raises(ValueError, match="DONE"):
        tr.finish("DONE")
    try:
        raise ValueError("bad batch")
    except ValueError as exc:
        tr.fail(exc)
    assert status(store, tr.run_id) == "FAILED"


def test_unopenable_uri_raises_and_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    uri = f"sqlite:///{missing}/mlflow.db"
    with pytest.raises(TrackingError) as err:
        Tracker.start(uri, "exp", "run", {}, CONFIG, None, context_tags=False)
    assert uri in str(err.value)
    assert not (tmp_path / "no").exists()  # MLflow alone would have created the directory
    with pytest.raises(TrackingError, match="foo://bar"):
        Tracker.start("foo://bar", "exp", "run", {}, CONFIG, None, context_tags=False)
    with pytest.raises(TrackingError, match="foo://bar"):
        Tracker.resume("foo://bar", "0123456789abcdef0123456789abcdef")
    with pytest.raises(TrackingError, match="http://127.0.0.1:1"):  # refused: fails at once
        Tracker.start("http://127.0.0.1:1", "exp", "run", {}, CONFIG, None, context_tags=False)


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_store_is_refused(uri):
    """A store with no database file would record a run that exists nowhere once the process ends."""
    with pytest.raises(TrackingError, match="names no database file"):
        open_client(uri)


def _open_when_told(uri, go, errors):
    go.wait(60)
    try:
        open_client(uri)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def test_processes_opening_a_fresh_store_together_create_its_schema_once(tmp_path, template_db):
    """Without the schema lock, MLflow's migrations collide ("duplicate column name", "table ... already exists").
    The processes are forked from this one, MLflow already imported, so that they open the store at once."""
    import multiprocessing

    open_client(f"sqlite:///{template_db}")  # MLflow's store modules imported before the fork
    ctx = multiprocessing.get_context("fork")
    uri, go, errors = f"sqlite:///{tmp_path}/fresh.db", ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_when_told, args=(uri, go, errors)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0], [errors.get() for _ in range(errors.qsize())]
    assert open_client(uri).search_experiments()  # one usable store with its Default experiment


def test_nested_run_carries_parent_tag(store):
    with start(store, "ablation") as parent:
        with start(store, "arm-1", parent_run_id=parent.run_id) as child:
            pass
    client = open_client(store[0])
    assert client.get_run(child.run_id).data.tags[TAG_PARENT_RUN_ID] == parent.run_id
    assert TAG_PARENT_RUN_ID not in client.get_run(parent.run_id).data.tags
    with pytest.raises(TrackingError, match="ffffffffffffffffffffffffffffffff"):
        start(store, parent_run_id="ffffffffffffffffffffffffffffffff")


def test_runs_in_threads(store):
    errors = []

    def arm(i):
        try:
            with start(store, f"arm-{i}", max_buffered_metrics=100) as tr:
                for step in range(20):
                    tr.log_metrics({f"x/{j}": float(i) for j in range(30)}, step=step)
                    tr.log_table("t", [{"i": i}], step=step)
            results[i] = tr.run_id
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    results = {}
    threads = [threading.Thread(target=arm, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, run_id in results.items():
        df = read_metrics(store[0], run_id)
        assert len(df) == 600 and set(df["value"]) == {float(i)}
        assert len(read_table(store[0], run_id, "t")) == 20


def test_metrics_hook_logs_window_means_every_n_steps():
    """tracking.log_every = 3: each metric's mean over the window (NaN skipped), state at its end; a
    checkpoint and the end of training close a window early; TABLE_ONLY counts never go to MLflow."""
    from types import SimpleNamespace

    from daro_lab.hooks import MetricsHook

    class Rec:
        def __init__(self):
            self.logged = []

        def log_metrics(self, m, step):
            self.logged.append((step, dict(m)))

        def flush(self):
            pass

    rec = Rec()
    hook = MetricsHook(rec)
    hook.on_train_start(SimpleNamespace(cfg=SimpleNamespace(tracking=SimpleNamespace(log_every=3))))
    nan = float("nan")
    for step in range(1, 9):
        hook.on_step_end(
            step,
            {
                "reward/mean": float(step),
                "length/correct": nan if step < 3 else 10.0 * step,
                "prompts/mu_1of4": 5.0,
                "daro/weight/mu_1of4": 1.0 + step,
            },
        )
        if step == 5:
            hook.on_checkpoint(step)
    hook.on_train_end(8, "FINISHED")
    # windows end at multiples of 3; the checkpoint closes 4-5, the end closes 7-8
    assert [s for s, _ in rec.logged] == [3, 5, 6, 8]
    # means, but the DARO weights as they stand at the window's last step
    assert rec.logged[0][1] == {"reward/mean": 2.0, "length/correct": 30.0, "daro/weight/mu_1of4": 4.0}
    assert rec.logged[1][1] == {"reward/mean": 4.5, "length/correct": 45.0, "daro/weight/mu_1of4": 6.0}
    assert rec.logged[2][1] == {"reward/mean": 6.0, "length/correct": 60.0, "daro/weight/mu_1of4": 7.0}
    assert rec.logged[3][1] == {"reward/mean": 7.5, "length/correct": 75.0, "daro/weight/mu_1of4": 9.0}
    # log_every = 1 (default): every step's own values, NaN kept
    rec1 = Rec()
    one = MetricsHook(rec1)
    one.on_step_end(1, {"length/correct": nan, "loss/total": 0.25})
    ((step, m),) = rec1.logged
    assert step == 1 and m["loss/total"] == 0.25 and m["length/correct"] != m["length/correct"]  # NaN


def test_run_store_finds_reads_and_marks_runs(store, tmp_path):
    """RunStore: the one door to runs that already exist (the ablation scheduler, --resume, eval)."""
    from daro_lab.config import Config, ConfigError
    from daro_lab.tracking import RunStore, config_of_run

    uri = store[0]
    with start(store, "parent") as parent:
        pass
    children = {}
    for arm, seed in (("a", 0), ("b", 0), ("a", 1)):
        tr = start(
            store,
            f"{arm}-seed{seed}",
            parent_run_id=parent.run_id,
            tags={"daro_lab.arm": arm, "daro_lab.seed": str(seed)},
            config_json=Config().to_json(),
        )
        children[(arm, seed)] = tr  # left RUNNING
    rs = RunStore(uri)
    assert {r.info.run_id for r in rs.children(parent.run_id)} == {t.run_id for t in children.values()}
    got = rs.children(parent.run_id, {"daro_lab.arm": "a", "daro_lab.seed": "1"})
    assert [r.info.run_id for r in got] == [children[("a", 1)].run_id]
    assert rs.children(parent.run_id, {"daro_lab.arm": "it's"}) == []  # a quote in a value is a value
    quoted = start(store, "quoted", parent_run_id=parent.run_id, tags={"daro_lab.arm": "it's"})
    assert [r.info.run_id for r in rs.children(parent.run_id, {"daro_lab.arm": "it's"})] == [quoted.run_id]
    quoted.finish()
    with pytest.raises(TrackingError, match=r"parent run 'f{32}' not found"):
        rs.children("f" * 32)

    rid = children[("a", 0)].run_id
    assert config_of_run(rs, rid) == Config()
    assert config_of_run(uri, children[("a", 1)].run_id) == Config()
    with start(store, "unreadable", config_json="[1, 2]") as bad:  # JSON, not a config
        pass
    with pytest.raises(ConfigError, match=f"run '{bad.run_id}': its config.json .*unknown config key '1'"):
        config_of_run(rs, bad.run_id)
    (next(Path(store[1]).rglob(f"{rid}/artifacts/config.json"))).unlink()
    with pytest.raises(ConfigError, match=f"run '{rid}' has no readable config.json"):
        config_of_run(rs, rid)
    with pytest.raises(ConfigError, match="no run 'nope'"):
        config_of_run(rs, "nope")
    with pytest.raises(TrackingError, match=f"run '{rid}' .* has no readable artifact 'missing.txt'"):
        rs.read_text(rid, "missing.txt")

    rs.set_tags(rid, {f"t{i}": i for i in range(150)})  # more than one batch
    rs.log_params(rid, {"trainer.lr": 5.0, "new.param": 2})  # a logged param keeps its value
    rs.log_metrics(rid, {"final_acc_mean/a": 0.5})
    rs.mark_failed(rid, "worker lost: boom")
    run = rs.run(rid)
    assert run.info.status == "FAILED" and run.data.tags["t149"] == "149"
    assert run.data.params["trainer.lr"] == "1e-06" and run.data.params["new.param"] == "2"
    assert run.data.metrics["final_acc_mean/a"] == 0.5
    assert rs.read_text(rid, "traceback.txt") == "worker lost: boom"
    rs.delete_tag(rid, "t0")
    rs.delete_tag(rid, "never-set")  # nothing to delete: no error
    assert "t0" not in rs.run(rid).data.tags

    gone = children[("b", 0)].run_id
    rs.supersede(rs.run(gone), "restarted", "daro_lab.superseded_by")
    assert gone not in {r.info.run_id for r in rs.children(parent.run_id)}
    dead = open_client(uri).get_run(gone)
    assert dead.info.lifecycle_stage == "deleted" and dead.info.status == "KILLED"
    assert dead.data.tags["daro_lab.superseded_by"] == "restarted"
