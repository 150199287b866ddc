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

    ui = procs.started([sys.executable, "-m", "daro_lab.cli", "ui", "--port", str(port), "--tracking-uri", store],
                       cwd=tmp_path, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

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
