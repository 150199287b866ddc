"""Interrupts and resumes: a checkpoint only ever holds a step boundary, every signal leaves the run
KILLED, a resume gives every later step's metrics of an uninterrupted run, one writer per run, bad checkpoints
and bad values named before the run changes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import _procs as procs
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.config import ConfigError, load_config
from daro_lab.hooks import Hook, default_hooks
from daro_lab.signals import Interrupted
from daro_lab.tracking import Tracker, open_client, read_metrics, read_table
from daro_lab.trainer import train
from daro_lab.trainer.checkpoint import CheckpointError, latest, load_checkpoint, save_checkpoint
from daro_lab.trainer.lock import RunLock, RunLockedError

runner = CliRunner()
# SMALL evaluates every 2 steps too; at lr 1e-3 every step has a mini-batch to update on (0 < mu < 1)
RUN = ["algo.method=daro", "trainer.lr=1e-3", "trainer.steps=4", "trainer.checkpoint_every=2"]
VOLATILE = ("time/", "perf/")


def stable(uri, run_id):
    df = read_metrics(uri, run_id)
    return df[~df.key.str.startswith(VOLATILE)].set_index(["key", "step"]).value.sort_index()


def per_mu(uri, run_id):
    return read_table(uri, run_id, "per_mu").sort_values(["step", "minibatch", "k"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_env, migrated_db):
    """(uri, run id) of the uninterrupted 4-step run every resumed one is compared with."""
    d = tmp_path_factory.mktemp("reference")
    shutil.copy(migrated_db, d / "mlflow.db")
    uri = f"sqlite:///{d}/mlflow.db"
    cfg = load_config(None, [*small_env, *RUN, f"tracking.uri={uri}", f"trainer.checkpoint_dir={d}/ckpt"])
    return uri, train(cfg, progress=False)


def assert_same_run(reference, uri, run_id):
    a, b = stable(*reference), stable(uri, run_id)
    assert len(a) > 50 and a.index.equals(b.index), set(a.index) ^ set(b.index)
    assert np.array_equal(a.values, b.values, equal_nan=True), a.compare(b)
    assert per_mu(*reference).equals(per_mu(uri, run_id))


class At(Hook):
    """Calls `act()` once: after mini-batch `index` of step `step` ('minibatch') or at the evaluation of `step` ('eval')."""

    def __init__(self, event, step, act, index=0):
        self.event, self.step, self.act, self.index = event, step, act, index

    def on_minibatch(self, view):
        if self.event == "minibatch" and (view.step, view.index) == (self.step, self.index):
            self.act()

    def on_eval(self, step, metrics, table):
        if self.event == "eval" and step == self.step:
            self.act()


def ctrl_c():
    raise KeyboardInterrupt


def send(sig):
    return lambda: os.kill(os.getpid(), sig)


def hooked(*extra):
    return lambda t: default_hooks(t) + list(extra)


def only_run(uri):
    client = open_client(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint is a step boundary; the run knows where its checkpoints are; a FINISHED run stays finished


def test_interrupt_inside_a_step_discards_it_and_a_resume_elsewhere_matches_the_uninterrupted_run(
    tmp_path, small_cfg, store, reference, monkeypatch
):
    """KeyboardInterrupt after the first optimizer step of step 3: the half-done step is not saved (step_000002 stays
    the periodic one), and --resume from another directory continues from it, writing beside it, to the same numbers."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = small_cfg(*RUN, "trainer.checkpoint_dir=ckpt")  # relative: resolved where the run starts
    with pytest.raises(KeyboardInterrupt) as exc:
        train(cfg, hooks=hooked(At("minibatch", 3, ctrl_c)), progress=False)
    run = only_run(store)
    root = tmp_path / "a" / "ckpt" / run.info.run_id
    assert run.info.status == "KILLED" and latest(root).name == "step_000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_000002"]
    assert exc.value.daro_lab_run.step is None and exc.value.daro_lab_run.resume_from == str(root / "step_000002")
    assert not (root / "lock").exists()

    monkeypatch.chdir(tmp_path / "b")
    assert train(resume=run.info.run_id, progress=False, tracking_uri=store) == run.info.run_id
    assert open_client(store).get_run(run.info.run_id).info.status == "FINISHED"
    assert latest(root).name == "step_000004" and not (tmp_path / "b" / "ckpt").exists()
    assert_same_run(reference, store, run.info.run_id)
    with pytest.raises(ConfigError, match="is FINISHED: there is nothing to resume"):  # its end time stays
        train(resume=run.info.run_id, progress=False, tracking_uri=store)


def test_first_ctrl_c_finishes_the_step_and_saves_it(tmp_path, small_cfg, store, reference):
    """A real SIGINT during step 3: the step finishes, its boundary is saved as step_000003, the run is KILLED,
    and the resume continues from it to the same numbers."""
    with pytest.raises(Interrupted) as exc:
        train(small_cfg(*RUN), hooks=hooked(At("minibatch", 3, send(signal.SIGINT))), progress=False)
    run = only_run(store)
    root = Path(run.data.tags["daro_lab.checkpoint_dir"])
    assert exc.value.signum == signal.SIGINT and exc.value.daro_lab_run.step == 3
    assert run.info.status == "KILLED" and latest(root).name == "step_000003"
    train(resume=run.info.run_id, progress=False, tracking_uri=store)
    assert_same_run(reference, store, run.info.run_id)


def test_first_ctrl_c_in_a_step_whose_checkpoint_is_due_says_that_step_was_saved(small_cfg, store):
    """SIGINT during step 2 (checkpoint_every=2): the loop saves step 2 as it would anyway, then stops there; what
    the CLI prints says so (it used to say the unfinished step was discarded)."""
    from daro_lab.cli import _interrupt_message

    with pytest.raises(Interrupted) as exc:
        train(small_cfg(*RUN), hooks=hooked(At("minibatch", 2, send(signal.SIGINT))), progress=False)
    run = only_run(store)
    assert exc.value.daro_lab_run.step == 2 and latest(run.data.tags["daro_lab.checkpoint_dir"]).name == "step_000002"
    msg = _interrupt_message(exc.value)
    assert "stopped after step 2, whose checkpoint is saved" in msg and "discarded" not in msg, msg
    assert run.data.tags["daro_lab.checkpoint_step"] == "2"


def _killed_after_step_3(small_cfg, store):
    """A run stopped by a first Ctrl-C after step 3: checkpoints step_000002 and step_000003."""
    with pytest.raises(Interrupted):
        train(small_cfg(*RUN), hooks=hooked(At("minibatch", 3, send(signal.SIGINT))), progress=False)
    run = only_run(store)
    return run.info.run_id, Path(run.data.tags["daro_lab.checkpoint_dir"])


def test_a_pointer_to_a_missing_step_resumes_from_the_newest_intact_one(small_cfg, store, reference, capsys):
    run_id, root = _killed_after_step_3(small_cfg, store)
    shutil.rmtree(root / "step_000003")  # `latest` names a step that is gone; step_000002 is intact
    (root / "step_000001").mkdir()  # an incomplete folder is not a checkpoint
    train(resume=run_id, progress=False, tracking_uri=store)
    err = capsys.readouterr().err
    assert f"resuming from {root / 'step_000002'}" in err and "names step_000003, which is missing" in err, err
    assert_same_run(reference, store, run_id)


def test_a_run_whose_checkpoints_were_moved_away_is_refused_not_restarted(small_cfg, store, tmp_path):
    run_id, root = _killed_after_step_3(small_cfg, store)
    before = stable(store, run_id)
    shutil.move(root, tmp_path / "elsewhere")
    res = runner.invoke(app, ["train", "--resume", run_id, "--tracking-uri", store])
    assert res.exit_code == 2, res.output
    assert f"saved checkpoints (the last at step 3) under {root}" in res.output and "step_NNNNNN" in res.output
    assert open_client(store).get_run(run_id).info.status == "KILLED"
    assert stable(store, run_id).equals(before)  # nothing it recorded is dropped
    assert not (root / "lock").exists()
    shutil.rmtree(root)  # the lock's folder; the checkpoints come back, and the resume continues from step 3
    shutil.move(tmp_path / "elsewhere", root)
    train(resume=run_id, progress=False, tracking_uri=store)
    assert open_client(store).get_run(run_id).info.status == "FINISHED"


def test_second_ctrl_c_stops_at_once_and_a_bad_checkpoint_is_refused_before_the_run_changes(small_cfg, store):
    """Two SIGINTs in step 3: stopped inside it, nothing saved (step_000002 stays the resume point). Then a
    tampered state.pt is named, PyTorch's advice to load it unsafely is not repeated, and the run stays KILLED."""
    twice = send(signal.SIGINT)
    with pytest.raises(Interrupted):
        train(small_cfg(*RUN), progress=False, hooks=hooked(At("minibatch", 3, lambda: (twice(), twice()))))
    run = only_run(store)
    root = Path(run.data.tags["daro_lab.checkpoint_dir"])
    assert run.info.status == "KILLED" and latest(root).name == "step_000002"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 2, "x": Evil()}, root / "step_000002" / "state.pt")
    with pytest.raises(CheckpointError) as err:
        train(resume=run.info.run_id, progress=False, tracking_uri=store)
    msg = str(err.value)
    assert f"checkpoint {root / 'step_000002'} is not a valid daro-lab checkpoint" in msg and "weights_only" not in msg
    assert open_client(store).get_run(run.info.run_id).info.status == "KILLED"
    assert not (root / "lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# an interrupted evaluation is redone


@pytest.mark.parametrize("step", [0, 2])
def test_interrupt_during_an_evaluation_loses_nothing(small_cfg, store, reference, step, capsys):
    """Interrupted while evaluating step 0 (the starting policy) or step 2: no checkpoint holds that boundary, so the
    resume redoes the evaluation: start metrics, start_mu_hist and the warm-start record included."""
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(*RUN), hooks=hooked(At("eval", step, ctrl_c)), progress=False)
    run = only_run(store)
    assert run.info.status == "KILLED" and latest(run.data.tags["daro_lab.checkpoint_dir"]) is None
    train(resume=run.info.run_id, progress=False, tracking_uri=store)
    assert "never wrote a checkpoint" in capsys.readouterr().err
    assert_same_run(reference, store, run.info.run_id)
    m = read_metrics(store, run.info.run_id)
    assert {0, 2, 4} <= set(m[m.key == "eval/greedy_acc"].step)
    assert len(read_table(store, run.info.run_id, "start_mu_hist")) == len(read_table(*reference, "start_mu_hist"))
    client = open_client(store)
    assert "warmstart.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP stop like Ctrl-C; a repeated signal cannot keep the run from being marked


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_mark_the_run_killed(small_cfg, store, sig):
    class Unhandled(Exception):
        pass

    def before(signum, frame):  # what the signal did before train() handled it (here: fail the test, not kill pytest)
        raise Unhandled(signum)

    previous = signal.signal(sig, before)
    try:
        with pytest.raises(Interrupted) as exc:
            train(small_cfg(*RUN), hooks=hooked(At("minibatch", 1, send(sig))), progress=False)
        assert signal.getsignal(sig) is before  # restored when train() ends
    finally:
        signal.signal(sig, previous)
    assert exc.value.signum == sig
    again = pickle.loads(pickle.dumps(exc.value))  # as an ablation's worker process sends it back
    assert again.signum == sig and again.daro_lab_run.status == "KILLED"
    run = only_run(store)
    assert run.info.status == "KILLED" and latest(run.data.tags["daro_lab.checkpoint_dir"]) is None


def test_a_second_signal_while_the_run_is_marked_is_ignored(small_cfg, store, monkeypatch):
    finish = Tracker.finish

    def ctrl_c_again(self, status="FINISHED"):
        if status == "KILLED":
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the run is being closed
        return finish(self, status)

    monkeypatch.setattr(Tracker, "finish", ctrl_c_again)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(*RUN), hooks=hooked(At("minibatch", 1, ctrl_c)), progress=False)
    assert only_run(store).info.status == "KILLED"


def test_cli_says_what_an_interrupt_or_a_crash_did(monkeypatch, tmp_path):
    from daro_lab.trainer.run import RunEnd

    def stopped(*a, **k):
        e = Interrupted(signal.SIGTERM)
        e.daro_lab_run = RunEnd("abc123", "KILLED", None, "/ck/abc123/step_000020")
        raise e

    monkeypatch.setattr("daro_lab.trainer.train", stopped)
    res = runner.invoke(app, ["train", "--set", "trainer.steps=1"])
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "SIGTERM" in res.output and "discarded" in res.output and "abc123 is marked KILLED" in res.output
    assert "/ck/abc123/step_000020" in res.output

    def crash_before_run(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("daro_lab.trainer.train", crash_before_run)
    res = runner.invoke(app, ["train", "--set", "trainer.steps=1"])
    assert res.exit_code == 1 and "before any MLflow run was created" in res.output and "FAILED" not in res.output


def test_ablation_cli_says_what_an_interrupt_did_to_the_running_arm(monkeypatch):
    """Ctrl-C in a sweep: the arm's run and whether a step was saved (train() says), not a blanket 'saved'."""
    from daro_lab.trainer.run import RunEnd

    ends = [RunEnd("arm42", "KILLED", 7, "/ck/arm42/step_000007"), RunEnd("arm43", "KILLED", None, None), None]
    for end in ends:

        def stopped(*a, end=end, **k):
            e = KeyboardInterrupt()
            if end is not None:
                e.daro_lab_run = end
            raise e

        monkeypatch.setattr("daro_lab.ablation.run_ablation", stopped)
        res = runner.invoke(app, ["run", "ablation", "static-weights"])
        assert res.exit_code == 130, res.output
        assert "continue the sweep with --resume PARENT_RUN_ID" in res.output
        if end is None:
            assert "each resumable from its last saved step" in res.output
        elif end.step is not None:
            assert "run arm42 is KILLED (it stopped after step 7, whose checkpoint is saved)" in res.output
        else:
            assert "run arm43 is KILLED (its unfinished step was discarded, not saved)" in res.output


def test_sigterm_to_an_ablation_exits_143_between_arms_too(monkeypatch):
    """SIGTERM while the sweep is between arms (no train() handling signals): the sweep stops, exit 128 + 15."""

    def between_arms(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the sweep")

    monkeypatch.setattr("daro_lab.ablation.run_ablation", between_arms)
    before = signal.getsignal(signal.SIGTERM)
    res = runner.invoke(app, ["run", "ablation", "static-weights"])
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "the parent run is KILLED" in res.output
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------------------------
# one writer per run


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    path = tmp_path / "run" / "lock"
    first = RunLock(path, "r1").acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(path, "r1").acquire()  # another open file: flock refuses it even in this process
    first.release()
    assert not path.exists()
    # a lock file left by a process that died (SIGKILL): free on this host, taken over
    path.write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "time": 0}))
    taken = RunLock(path, "r1").acquire()
    assert taken.previous["pid"] == 999999 and json.loads(path.read_text())["pid"] == os.getpid()
    taken.release()
    # written on another host: cannot be checked from here, so only --force takes it
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
    with pytest.raises(RunLockedError, match="on host elsewhere.*--force"):
        RunLock(path, "r1").acquire()
    RunLock(path, "r1").acquire(force=True).release()


def test_a_lock_read_while_its_owner_writes_it_always_names_the_owner(tmp_path):
    """One thread takes and releases the lock over and over; every refusal the other meets names a pid and a host
    (the file is replaced in one rename, never seen half written)."""
    import threading

    path = tmp_path / "run" / "lock"
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            try:
                RunLock(path, "r1").acquire().release()
            except RunLockedError:
                pass

    t = threading.Thread(target=churn)
    t.start()
    refused = []
    try:
        for _ in range(400):
            try:
                RunLock(path, "r1").acquire().release()
            except RunLockedError as e:
                refused.append(str(e))
    finally:
        stop.set()
        t.join()
    assert refused, "the two threads never met"
    assert not [m for m in refused if "pid ?" in m or "host ?" in m], refused[:3]
    assert all(f"pid {os.getpid()} on host {socket.gethostname()}" in m for m in refused), refused[:3]


@pytest.mark.slow
def test_resume_of_a_run_that_a_live_process_trains_is_refused_and_sighup_marks_it_killed(
    tmp_path, small_env, store, wait_for_checkpoint
):
    """`daro-lab train` in a subprocess: a second writer is refused while it runs; SIGHUP (the terminal closed)
    stops it with exit 129, the run KILLED, its lock released and the message saying where it resumes."""
    sets = [
        x
        for o in [
            *small_env,
            "trainer.steps=1000",
            "trainer.checkpoint_every=2",
            f"tracking.uri={store}",
            f"trainer.checkpoint_dir={tmp_path}/ckpt",
        ]
        for x in ("--set", o)
    ]
    with procs.started(
        [sys.executable, "-m", "daro_lab.cli", "train", *sets],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        run_id, root = wait_for_checkpoint(open_client(store), "attributes.status = 'RUNNING'", proc, 2)
        with pytest.raises(RunLockedError, match=f"being trained by another process, pid {proc.pid}"):
            train(resume=run_id, progress=False, tracking_uri=store)
        proc.send_signal(signal.SIGHUP)
        out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGHUP, out[-2000:]
    assert open_client(store).get_run(run_id).info.status == "KILLED"
    assert f"run {run_id} is marked KILLED" in out and "SIGHUP" in out
    assert not (Path(root) / "lock").exists() and latest(root) is not None


# ---------------------------------------------------------------------------------------------------------------
# bad models exit 2 naming them, with no run


def test_bad_model_path_and_empty_resume_exit_2_naming_them_with_no_run(tmp_path, store, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_hf import make_model_dir

    monkeypatch.chdir(tmp_path)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    truncated = make_model_dir(tmp_path / "truncated")
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    for path in (not_a_model, truncated):
        res = runner.invoke(
            app, ["train", "--set", f"model.path={path}", "--set", "trainer.steps=1", "--tracking-uri", store]
        )
        assert res.exit_code == 2 and f"model.path '{path}'" in res.output and "FAILED" not in res.output, res.output
    res = runner.invoke(app, ["train", "--resume", "", "--tracking-uri", store])
    assert res.exit_code == 2 and "--resume needs the id" in res.output, res.output
    client = open_client(store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


# ---------------------------------------------------------------------------------------------------------------
# checkpoints that are corrupt, tampered with or not daro-lab's


def test_bad_checkpoints_are_named_without_unsafe_advice(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = {
        "step": 1,
        "cursor": 0,
        "order": torch.arange(3),
        "optimizer": {},
        "weights": {},
        "rollout_gen": torch.Generator().get_state(),
        "data_gen": torch.Generator().get_state(),
    }
    good = save_checkpoint(tmp_path / "good", model, state, {"step": 1})
    assert load_checkpoint(good, model)["step"] == 1

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(d, torch.nn.Linear(2, 2))
        msg = str(err.value)
        assert msg.startswith(f"checkpoint {d} is not a valid daro-lab checkpoint: ")
        assert "weights_only" not in msg and "safe_globals" not in msg
        return msg

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    assert "refused, never executed" in broken("tampered", lambda d: torch.save({"x": Evil()}, d / "state.pt"))
    assert "model.safetensors: " in broken(
        "truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:20])
    )
    assert "state.pt is not a complete torch.save file" in broken(
        "cut", lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:-300])
    )
    assert "lacks 'rng'" in broken("no_rng", lambda d: torch.save(state, d / "state.pt"))
    assert "missing" in broken("missing", lambda d: (d / "state.pt").unlink())
