"""Bad input and failures: clear errors naming the bad thing, nothing half-written left RUNNING."""

from __future__ import annotations

import time
import urllib.request

import pytest
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.hooks import Hook, default_hooks
from daro_lab.tracking import open_client, read_metrics
from daro_lab.trainer import train
from daro_lab.trainer.checkpoint import latest

runner = CliRunner()


def runs_in(u: str):
    c = open_client(u)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps) if exps else []


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config", "nope.toml"], "config file not found: nope.toml"),
        (["--set", "algo.method=ppo"], "unknown method 'ppo'"),
        (["--algo", "ppo"], "unknown method 'ppo'"),
        (["--set", "model.path=/no/such/model"], "/no/such/model"),
        (["--set", "trainer.stpes=3"], "unknown config key 'trainer.stpes'"),
    ],
)
def test_bad_input_exits_nonzero_naming_it_and_leaves_no_run(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    u = f"sqlite:///{tmp_path}/mlflow.db"
    res = runner.invoke(app, ["train", "--tracking-uri", u, *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert all(r.info.status != "RUNNING" for r in runs_in(u))
    assert runs_in(u) == []


def test_malformed_config_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("[trainer\nsteps = 3\n")
    res = runner.invoke(app, ["train", "--config", "bad.toml"])
    assert res.exit_code == 2 and "bad.toml is not valid TOML" in res.output


def test_tracking_uri_that_cannot_be_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", "--tracking-uri", "sqlite:////no/such/dir/m.db"])
    assert res.exit_code == 2 and "sqlite:////no/such/dir/m.db" in res.output
    res = runner.invoke(app, ["train", "--resume", "0123abcd", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert res.exit_code == 2 and "0123abcd" in res.output


class Boom(Hook):
    def __init__(self, exc):
        self.exc = exc

    def on_step_end(self, step, metrics):
        if step == 2:
            raise self.exc


def test_crash_marks_run_failed_with_traceback(small_cfg, store):
    cfg = small_cfg("trainer.steps=4")
    with pytest.raises(RuntimeError, match="boom at step 2"):
        train(cfg, hooks=lambda t: default_hooks(t) + [Boom(RuntimeError("boom at step 2"))], progress=False)
    (run,) = runs_in(store)
    assert run.info.status == "FAILED"
    tb = open_client(store).download_artifacts(run.info.run_id, "traceback.txt")
    assert "boom at step 2" in open(tb).read()
    # what was logged before the crash is intact
    m = read_metrics(store, run.info.run_id)
    assert 1 in set(m[m.key == "reward/mean"].step)


def test_ctrl_c_before_any_checkpoint_marks_killed_and_resumes_from_the_start(small_cfg, store):
    cfg = small_cfg("trainer.steps=3", "trainer.checkpoint_every=0")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=lambda t: default_hooks(t) + [Boom(KeyboardInterrupt())], progress=False)
    (run,) = runs_in(store)
    assert run.info.status == "KILLED"
    assert latest(run.data.tags["daro_lab.checkpoint_dir"]) is None  # inside step 2: nothing half-done is saved
    run_id = train(resume=run.info.run_id, progress=False, tracking_uri=store)
    assert open_client(store).get_run(run_id).info.status == "FINISHED"
    steps = read_metrics(store, run_id)
    assert set(steps[steps.key == "reward/mean"].step) == {1, 2, 3}


@pytest.mark.slow
def test_ui_serves_the_store_on_localhost(store):
    from analyses.mlflow_ui import serve  # starts `daro-lab ui` on a free port, stops it with SIGTERM

    with serve(store) as base:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            body = r.read().decode()
        assert "OK" in body
    time.sleep(1)
    with pytest.raises(OSError):  # SIGTERM stopped the server and its workers: nothing is left serving
        urllib.request.urlopen(f"{base}/health", timeout=2)


def test_demo_trains_the_five_methods_and_says_where_they_are(tmp_path, monkeypatch, small_env, store):
    """The demo's loop and output, on the small arithmetic preset (the chain task's warm start is exercised by
    tests/test_chain_task.py): every method of the paper, one seed, recorded."""
    monkeypatch.chdir(tmp_path)
    small = [*small_env, "trainer.eval_every=0", "task.name=arithmetic", "model.warmstart_run_on=0"]
    sets = [x for kv in small for x in ("--set", kv)]
    res = runner.invoke(app, ["demo", "--steps", "1", "--tracking-uri", store, *sets])
    assert res.exit_code == 0, res.output
    runs = {r.data.tags["daro_lab.method"]: r for r in runs_in(store)}
    assert set(runs) == {"grpo", "dapo", "dr_grpo", "lipo", "daro"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert len({r.data.params["seed"] for r in runs.values()}) == 1
    assert "daro-lab report --experiment daro-lab-demo" in res.output
    for r in runs.values():
        assert r.info.run_id in res.output
    assert "daro-lab ui" in res.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_refuses_a_port_in_use_naming_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = runner.invoke(app, ["ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert res.exit_code == 2 and f"port {port} on 127.0.0.1 is not free" in res.output, res.output


@pytest.mark.slow
def test_ui_port_out_of_range_is_refused_and_port_0_serves_where_it_says(tmp_path, store):
    import os
    import re
    import signal
    import subprocess
    import sys

    import _procs as procs

    for bad in ("70000", "-1"):
        res = runner.invoke(app, ["ui", "--port", bad, "--tracking-uri", store])
        assert res.exit_code == 2 and f"--port {bad}: expected a port number in 1-65535" in res.output, res.output
    with procs.started(
        [sys.executable, "-m", "daro_lab.cli", "ui", "--port", "0", "--tracking-uri", store],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        line = proc.stdout.readline().decode()
        port = int(re.search(r"at http://127\.0\.0\.1:(\d+) ", line).group(1))
        assert port > 0, line
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert b"OK" in r.read()
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, line
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_ui_stops_its_server_when_the_terminal_closes(tmp_path, store):
    """SIGHUP (the terminal closed) to `daro-lab ui`: the MLflow server, in a session of its own so that it never
    sees the terminal's signals, is stopped with it; nothing keeps serving the store."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = _free_port()
    import _procs as procs

    ui = procs.started(
        [sys.executable, "-m", "daro_lab.cli", "ui", "--port", str(port), "--tracking-uri", store],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def serving() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return b"OK" in r.read()
        except OSError:
            return False

    with ui as proc:
        deadline = time.time() + 120
        while not serving():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 0
        db = store.removeprefix("sqlite:///")
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and db in _cmdline(p)]
        assert not left and not serving()


def _cmdline(p) -> str:
    try:
        return (p / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_demo_refuses_an_unknown_method_before_training_any(tmp_path, store, monkeypatch):
    monkeypatch.setattr("daro_lab.trainer.train", lambda *a, **k: pytest.fail("a method was trained"))
    res = runner.invoke(app, ["demo", "--methods", "grpo,foo", "--tracking-uri", store])
    assert res.exit_code == 2 and "--methods foo: config key 'algo.method': unknown method 'foo'" in res.output, (
        res.output
    )


def test_tiny_prompts_too_long_for_the_context_are_refused_before_the_warm_start(tmp_path, monkeypatch):
    from daro_lab.config import ConfigError, load_config
    from daro_lab.trainer import Trainer

    monkeypatch.setattr("daro_lab.models.load.warm_start", lambda *a, **k: pytest.fail("the warm start ran"))
    cfg = load_config(None, ["task.name=arithmetic", "task.max_digits=40", f"model.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"training prompts are longer than \d+ tokens"):
        Trainer(cfg)


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"1": 1.0, "9": 2.0}', "key '9' is outside k = 1..7 (K = rollout.num_responses = 8)"),
        ('{"0": 1.0}', "key '0' is outside k = 1..7"),
        ('{"2": -1.0}', "the weight of k = 2 must be a finite number > 0, got -1.0"),
        ('{"2": 0}', "the weight of k = 2 must be a finite number > 0, got 0"),
        ('{"2": NaN}', "the weight of k = 2 must be a finite number > 0, got nan"),
        ('{"2": {"w": 1}}', "the weight of k = 2 must be a finite number > 0, got {'w': 1}"),
        ('{"two": 1}', "key 'two' is not a number of right answers k"),
        ("[1, 2]", "is not a JSON object {k: weight}, it holds a list"),
    ],
)
def test_static_weights_file_with_bad_keys_or_values_names_them(tmp_path, content, needle):
    from daro_lab.config import ConfigError, load_config
    from daro_lab.trainer.setup import build_static_weights

    f = tmp_path / "w.json"
    f.write_text(content)
    cfg = load_config(None, ["algo.method=static", f"algo.daro.static={f}"])
    with pytest.raises(ConfigError) as e:
        build_static_weights(cfg)
    assert f"config key 'algo.daro.static': {f}" in str(e.value) and needle in str(e.value), str(e.value)


def test_static_weights_file_error_exits_2_with_no_run(tmp_path, store):
    f = tmp_path / "w.json"
    f.write_text('{"1": 1.0, "9": 2.0}')
    res = runner.invoke(
        app,
        [
            "train",
            "--set",
            "algo.method=static",
            "--set",
            f"algo.daro.static={f}",
            "--set",
            "trainer.steps=1",
            "--tracking-uri",
            store,
        ],
    )
    assert res.exit_code == 2 and "key '9' is outside k = 1..7" in res.output, res.output
    assert runs_in(store) == []


def test_model_dir_whose_pickle_carries_code_is_refused_without_advice_to_load_it_unsafely(tmp_path, store):
    import os
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_hf import make_model_dir

    d = make_model_dir(tmp_path / "evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    res = runner.invoke(app, ["train", "--set", f"model.path={d}", "--set", "trainer.steps=1", "--tracking-uri", store])
    assert res.exit_code == 2 and f"model.path {str(d)!r}" in res.output and "never executed" in res.output, res.output
    assert "weights_only" not in res.output and "Re-running" not in res.output and not marker.exists()
    assert runs_in(store) == []


def test_a_full_disk_under_the_mlflow_store_names_the_cause_and_the_runs_state(small_env, tmp_path, store, monkeypatch):
    """sqlite's own 'database or disk is full' (SQLITE_FULL, what a full device gives) from step 2 on: the store is
    capped with PRAGMA max_page_count on every connection MLflow checks out. The message names the cause and the
    run's state, not MLflow's 'Query-invoked autoflush' text; once there is space, --resume finishes the run."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    from daro_lab.trainer import train
    from daro_lab.trainer.loop import Trainer

    full = {"on": False}

    def cap(dbapi_conn, record, proxy):
        cur = dbapi_conn.cursor()
        n = cur.execute("PRAGMA page_count").fetchone()[0] if full["on"] else 2**30
        cur.execute(f"PRAGMA max_page_count = {n}")
        cur.close()

    step = Trainer.train_step

    def fill_after_step_2(self):
        m = step(self)
        full["on"] = full["on"] or self.step == 2
        return m

    event.listen(Pool, "checkout", cap)
    monkeypatch.setattr(Trainer, "train_step", fill_after_step_2)
    sets = [
        x
        for o in [
            *small_env,
            "trainer.steps=4",
            "trainer.checkpoint_every=1",
            f"trainer.checkpoint_dir={tmp_path}/ckpt",
        ]
        for x in ("--set", o)
    ]
    try:
        res = runner.invoke(app, ["train", *sets, "--tracking-uri", store])
    finally:
        full["on"] = False
    err = res.output
    (run,) = runs_in(store)
    rid = run.info.run_id
    assert res.exit_code == 1, err
    assert f"the MLflow store {store} is out of space (no space left on the device holding" in err, err
    assert "autoflush" not in err and f"--resume {rid} continues it" in err
    assert f"run {rid} could not be marked FAILED and still reads RUNNING" in err or f"run {rid} is marked" in err
    monkeypatch.setattr(Trainer, "train_step", step)
    try:
        assert train(resume=rid, progress=False, tracking_uri=store) == rid
    finally:
        event.remove(Pool, "checkout", cap)
    assert open_client(store).get_run(rid).info.status == "FINISHED"


def test_math_task_on_the_tiny_preset_names_the_row_its_tokenizer_cannot_encode(tmp_path, store, monkeypatch):
    """The tiny preset's character tokenizer has digits and operators only: a math data file is refused (exit 2)
    naming file, line and character, before the warm start (which would take minutes)."""
    import json

    monkeypatch.setattr("daro_lab.models.load.warm_start", lambda *a, **k: pytest.fail("the warm start ran"))
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(40)))
    res = runner.invoke(
        app,
        [
            "train",
            "--set",
            "task.name=math",
            "--set",
            f"task.train_file={f}",
            "--set",
            "task.num_eval=8",
            "--set",
            "trainer.steps=1",
            "--tracking-uri",
            store,
        ],
    )
    assert res.exit_code == 2 and f"{f}: line 1" in res.output and "character 'W'" in res.output, res.output
    assert runs_in(store) == []
