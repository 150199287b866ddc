import os
import sys
import uuid

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# every process this session starts inherits the marker; a session that leaves one running fails (below)
SESSION_MARKER = f"daro-lab-test-session-{uuid.uuid4().hex}"
os.environ["DARO_LAB_TEST_SESSION"] = SESSION_MARKER
sys.path.insert(0, os.path.dirname(__file__))


def pytest_sessionfinish(session, exitstatus):
    """No test leaves a process behind: list (and kill) any process of this session still alive at its end."""
    from _procs import MULTIPROCESSING_HELPERS, kill_all, wait_gone

    # a pool this process still owns (math-verify's) ends with it; anything else still alive would outlive it
    left = wait_gone(SESSION_MARKER, ignore=MULTIPROCESSING_HELPERS)
    if left:
        print(
            "\nprocesses this test session started and left running (killed now):\n  " + "\n  ".join(left),
            file=sys.stderr,
        )
        kill_all({int(x.split()[0]) for x in left})
        session.exitstatus = 1


# A very small training preset: one-digit addition, a 2-layer width-32 model, 8 prompts x 4 responses
# per step in two mini-batches (the second off-policy). Small enough for many end-to-end runs in CI.
SMALL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.warmstart_steps=150",
    "model.warmstart_batch=32",
    "task.max_digits=1",
    "task.num_train=80",
    "task.num_eval=16",
    "rollout.num_responses=4",
    "rollout.max_new_tokens=4",
    "trainer.prompts_per_step=8",
    "trainer.mini_batch_prompts=4",
    "trainer.eval_every=2",
    "trainer.grad_norm_every=2",
    "trainer.checkpoint_every=2",
    "trainer.lr=3e-3",
    # a fixed thread count: left at 0, each run would take the cores free when it starts (trainer/threads.py), and
    # two runs a test compares exactly could start under different loads (CI installs vLLM beside the tests)
    "trainer.threads=2",
]


@pytest.fixture(scope="session")
def small_env(tmp_path_factory):
    """SMALL plus one warm-start cache for the session, so the tiny model is warm-started once."""
    return [*SMALL, f"model.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory):
    """An empty MLflow sqlite database with its schema: creating one runs all of MLflow's migrations (about 10 s
    on 2 cores), so it is made once and copied for each test's store."""
    from daro_lab.tracking import open_client

    path = tmp_path_factory.mktemp("mlflow_schema") / "mlflow.db"
    open_client(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path, migrated_db):
    """A fresh MLflow tracking URI in the test's folder (an empty store, its schema copied in)."""
    import shutil

    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def small_cfg(tmp_path, small_env, store):
    """small_cfg(*overrides) -> Config of the small preset, tracked in `store`, checkpoints in tmp_path."""
    from daro_lab.config import load_config

    def make(*extra):
        return load_config(
            None, [*small_env, f"tracking.uri={store}", f"trainer.checkpoint_dir={tmp_path}/ckpt", *extra]
        )

    return make


@pytest.fixture
def wait_for_checkpoint():
    """wait_for_checkpoint(client, filter_string, proc, min_step) -> (run_id, checkpoint root): polls the
    'daro-lab' experiment until a run matching `filter_string` has a checkpoint of step >= min_step;
    fails the test if `proc` (the training process) exits first or 300 s pass."""
    import time

    from daro_lab.trainer.checkpoint import latest

    def wait(client, filter_string, proc, min_step, timeout=300):
        exp = client.get_experiment_by_name("daro-lab")
        deadline = time.time() + timeout
        while time.time() < deadline:
            exp = exp or client.get_experiment_by_name("daro-lab")
            runs = client.search_runs([exp.experiment_id], filter_string=filter_string) if exp else []
            root = runs[0].data.tags.get("daro_lab.checkpoint_dir") if runs else None
            d = latest(root) if root else None
            if d is not None and d.name >= f"step_{min_step:06d}":
                return runs[0].info.run_id, root
            if proc.poll() is not None:
                pytest.fail(f"training exited before it was killed: {proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no step-{min_step} checkpoint within {timeout} s")

    return wait
