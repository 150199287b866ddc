import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A very small training preset: one-digit addition, a 2-layer width-32 model, 8 prompts x 4 responses
# per step in two mini-batches (the second off-policy). Small enough for many end-to-end runs in CI.
SMALL = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.warmstart_steps=150",
    "model.warmstart_batch=32", "task.max_digits=1", "task.num_train=80", "task.num_eval=16",
    "rollout.num_responses=4", "rollout.max_new_tokens=4", "trainer.prompts_per_step=8",
    "trainer.mini_batch_prompts=4", "trainer.eval_every=2", "trainer.grad_norm_every=2",
    "trainer.checkpoint_every=2", "trainer.lr=3e-3",
]


@pytest.fixture(scope="session")
def small_env(tmp_path_factory):
    """SMALL plus one warm-start cache for the session, so the tiny model is warm-started once."""
    return [*SMALL, f"model.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture
def store(tmp_path):
    """A fresh MLflow tracking URI in the test's folder."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def small_cfg(tmp_path, small_env, store):
    """small_cfg(*overrides) -> Config of the small preset, tracked in `store`, checkpoints in tmp_path."""
    from daro_lab.config import load_config

    def make(*extra):
        return load_config(None, [*small_env, f"tracking.uri={store}", f"trainer.checkpoint_dir={tmp_path}/ckpt", *extra])

    return make
