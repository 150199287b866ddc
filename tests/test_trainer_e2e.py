"""End to end: a few real RL steps of every method on a very small preset, recorded in MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import _procs as procs
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daro_lab.algorithms import METHODS
from daro_lab.tracking import list_tables, open_client, read_metrics, read_table
from daro_lab.trainer import train

pytestmark = pytest.mark.slow

VOLATILE = ("time/", "perf/")  # wall-clock metrics: the only ones allowed to differ between runs


def stable(df):
    return df[~df.key.str.startswith(VOLATILE)].set_index(["key", "step"]).value.sort_index()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_is_recorded(small_cfg, store, method):
    cfg = small_cfg(f"algo.method={method}", "trainer.steps=3", "algo.daro.static=shape:dr_grpo")
    from daro_lab.models import load_policy

    before, _ = load_policy(cfg.model, cfg.model.init_seed, cfg.task)
    run_id = train(cfg, progress=False)
    client = open_client(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.method"] == method
    m = read_metrics(store, run_id)
    keys = set(m.key)
    per_mu = read_table(store, run_id, "per_mu")
    assert len(per_mu), "no per-mu rows: no interior pass rate in 3 steps"
    for k in sorted(set(per_mu.k)):
        key = f"mu_{k}of4"
        for q in ("loss", "contrib", "scale", "len_correct", "clipfrac_pos"):
            assert f"{q}/{key}" in keys, f"{q}/{key} missing"
    # one vocabulary (daro_lab.record): the table's columns are the metrics' quantity names
    assert {
        "loss",
        "contrib",
        "scale",
        "mass",
        "prompts",
        "tokens",
        "len_correct",
        "clipfrac_pos",
        "clipfrac_neg",
    } <= set(per_mu.columns)
    if METHODS[method].weights != "none":
        assert {"daro/weight_used", "daro/wL", "daro/wS", "daro/signal", "contrib_offset", "reg"} <= set(per_mu.columns)
    assert not keys & {"batch/prompts_mu0", "batch/prompts_mu1"}  # never emitted: the rollout's rollout/prompts_mu0|1
    assert {"reward/mean", "eval/greedy_acc", "grad/norm", "time/generate", "rollout/prompts_mu0"} <= keys
    assert any(k.startswith("gradnorm/mu_") for k in keys)
    # the engine's sampling log-probs are the trainer's (the transformers engine samples the live fp32 policy)
    gap = m[m.key == "rollout/engine_logprob_gap_max"].value
    updated = m[(m.key == "rollout/kept_prompts") & (m.value > 0)]  # a step without kept prompts makes no update
    assert len(updated) and len(gap) == len(updated) and gap.max() < 1e-4, gap.tolist()
    if METHODS[method].weights != "none":
        assert any(k.startswith("daro/weight/mu_") for k in keys)
    tables = set(list_tables(store, run_id))
    assert {"per_mu", "eval", "mu_hist", "start_mu_hist", "samples"} <= tables
    # the final checkpoint is an artifact, and the policy moved
    ckpt = Path(client.download_artifacts(run_id, "checkpoint"))
    after = load_file(str(ckpt / "model.safetensors"))
    changed = [n for n, p in before.state_dict().items() if n in after and not torch.equal(p, after[n])]
    assert changed, "no policy parameter changed"


def test_same_config_and_seed_give_identical_metrics(small_cfg, store):
    ids = [train(small_cfg("trainer.steps=3", "algo.method=daro"), progress=False) for _ in range(2)]
    a, b = (stable(read_metrics(store, i)) for i in ids)
    assert len(a) > 50
    assert a.index.equals(b.index), set(a.index) ^ set(b.index)
    assert np.array_equal(a.values, b.values, equal_nan=True), a.compare(b)
    # grad/clipped: the share of a step's updates whose pre-clip norm exceeded trainer.grad_clip (1.0 here)
    clipped, norm = a.loc["grad/clipped"], a.loc["grad/norm"]
    assert len(clipped) >= 1 and clipped.between(0, 1).all()  # steps with an update (a step may keep no prompt)
    assert (norm[clipped == 1] > 1.0).all() and (norm[clipped == 0] <= 1.0).all(), (clipped, norm)


def test_gradient_accumulation_records_the_run_of_one_pass(small_cfg, store):
    """trainer.micro_batch_prompts=1 (4 passes per mini-batch of 4 prompts): the same MLflow metrics, hooks'
    per-mu tables included, as each mini-batch in one pass, to float32 rounding."""
    base = ["trainer.steps=3", "algo.method=daro", "trainer.grad_norm_every=1"]
    ids = [train(small_cfg(*base, f"trainer.micro_batch_prompts={m}"), progress=False) for m in (0, 1)]
    a, b = (stable(read_metrics(store, i)) for i in ids)
    assert len(a) > 50 and a.index.equals(b.index), set(a.index) ^ set(b.index)
    assert np.allclose(a.values, b.values, rtol=1e-4, atol=1e-5, equal_nan=True), a.compare(b)
    ta, tb = (
        read_table(store, i, "per_mu").sort_values(["step", "minibatch", "k"]).reset_index(drop=True) for i in ids
    )
    assert len(ta) and ta.columns.equals(tb.columns)
    num = ta.select_dtypes("number").columns
    assert np.allclose(ta[num].values, tb[num].values, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, small_env, small_cfg, store, wait_for_checkpoint):
    steps = 6
    extra = ["algo.method=daro", f"trainer.steps={steps}", "trainer.checkpoint_every=2"]
    ref = train(small_cfg(*extra), progress=False)

    # the same run in a subprocess, slowed by a hook (hooks never change numbers), killed with SIGKILL
    # once its step-4 checkpoint exists
    overrides = [*small_env, *extra, f"tracking.uri={store}", f"trainer.checkpoint_dir={tmp_path}/ckpt"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    client = open_client(store)
    with procs.started(
        [sys.executable, str(Path(__file__).parent / "_slow_train.py"), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    ) as proc:
        run_id, _ = wait_for_checkpoint(client, "attributes.status = 'RUNNING'", proc, 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it as it was

    resumed = train(resume=run_id, progress=False, tracking_uri=store)
    assert resumed == run_id and client.get_run(run_id).info.status == "FINISHED"
    a, b = stable(read_metrics(store, ref)), stable(read_metrics(store, run_id))
    assert a.index.equals(b.index), set(a.index) ^ set(b.index)
    assert np.array_equal(a.values, b.values, equal_nan=True), a.compare(b)
    ta = read_table(store, ref, "per_mu")
    tb = read_table(store, run_id, "per_mu")
    assert (
        ta.sort_values(["step", "minibatch", "k"])
        .reset_index(drop=True)
        .equals(tb.sort_values(["step", "minibatch", "k"]).reset_index(drop=True))
    )
