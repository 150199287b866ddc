"""Data-parallel training on CPU: torchrun with 2 gloo processes against one process (issue 6, item 5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import _procs as procs
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daro_lab.tracking import open_client

pytestmark = pytest.mark.slow  # torchrun with 2 ranks: tens of seconds a test

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env():
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd):
    p = procs.run(cmd, timeout=600, cwd=cwd, env=_env())  # a timeout kills torchrun's ranks too
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return p


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_env):
    """(overrides, results of tests/_dist_check.py in one process): the reference of the 2-rank runs."""
    # 9 prompts in mini-batches of 3: ranks hold 2 and 1 prompts, or 1 and a filler
    # lr 3e-4, not the small preset's 3e-3: AdamW's first steps are ~lr * sign(g), so a gradient component near 0
    # whose float32 rounding differs between one process and two ranks moves by a whole lr step; at 3e-3 that put
    # DARO's log-probs 1.5e-4 apart after two updates on one warm start, at 3e-4 every method agrees to 1e-5
    ov = [
        *small_env,
        "trainer.threads=1",
        "trainer.prompts_per_step=9",
        "trainer.mini_batch_prompts=3",
        "trainer.grad_norm_every=1",
        "trainer.lr=3e-4",
    ]
    out = tmp_path_factory.mktemp("one") / "one.json"
    _run([sys.executable, str(HERE / "_dist_check.py"), str(out), *ov], out.parent)  # warm-starts first
    return ov, json.loads(out.read_text())


SPLITS = {  # how the same mini-batches are run: (processes, overrides)
    "ddp": (2, ["trainer.parallel=ddp"]),
    "fsdp": (2, ["trainer.parallel=fsdp"]),
    # gradient accumulation, one prompt per pass: 2 per rank (rank 1: one of fillers). One process accumulating
    # alone: tests/test_trainer_e2e.py (the run's metrics) and tests/test_losses.py (the loss's parts, every method)
    "ddp-accumulate": (2, ["trainer.parallel=ddp", "trainer.micro_batch_prompts=1"]),
    "fsdp-accumulate": (2, ["trainer.parallel=fsdp", "trainer.micro_batch_prompts=1"]),
}


@pytest.mark.parametrize("split", SPLITS)
def test_split_updates_equal_one_process_on_the_same_global_batch(tmp_path, one_process, split):
    """Every method (DARO also with the grad signal, chunked log-probs, one prompt per mini-batch, where
    rank 1 holds filler rows, tied embeddings, and gradient checkpointing), over 2 ranks with DDP or FSDP2,
    and with gradient accumulation in one process or on 2 ranks: the same per-mini-batch losses and metrics
    (G_mu included), the same DARO weights and the same policy parameters after two steps as one process
    taking each mini-batch in one pass, to float32 rounding."""
    ov, one = one_process
    procs, extra = SPLITS[split]
    cmd = [*TORCHRUN] if procs == 2 else [sys.executable]
    _run([*cmd, str(HERE / "_dist_check.py"), str(tmp_path / "two.json"), *ov, *extra], tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    # evaluation, split over the ranks: greedy results equal one process's, problem by problem
    one = dict(one)  # the fixture's dict is shared by the parametrized runs
    ea, eb = one.pop("evaluation"), two.pop("evaluation")
    assert ea == eb and len(ea["bench_correct"]) == 16 and sum(ea["table_n"]) == 16 and ea["sampled_keys"]
    assert ea["bench_correct"] == [1, 0] * 8 and ea["greedy"]["eval/greedy_acc"] == 0.5  # the planted pattern
    assert one.keys() == two.keys() and len(one) == 10
    for name in one:
        a, b = one[name], two[name]
        assert (a["world_size"], b["world_size"]) == (1, procs)
        assert not a["accumulated_passes"]
        # hooks see the whole mini-batch: every rank's rows, the passes' rows
        assert len(a["views"]) == len(b["views"])
        for va, vb in zip(a["views"], b["views"]):
            assert va[:2] == vb[:2] and vb[2:] == pytest.approx(va[2:], rel=1e-5), name
        passes = b["accumulated_passes"]
        if "accumulate" in split and "one-prompt" not in name:  # full mini-batches of 3 prompts: 3 passes in
            assert passes and max(passes) == (3 if procs == 1 else 2), passes  # one process, 2 on each of 2 ranks
        else:
            assert not passes, passes
        assert [len(s) for s in a["minibatches"]] == [len(s) for s in b["minibatches"]]
        assert sum(len(s) for s in a["minibatches"]) >= 4, "the check needs several mini-batches per step"
        for step_a, step_b in zip(a["minibatches"], b["minibatches"]):
            assert any(k.startswith("gradnorm/") for k in step_a[0])  # G_mu (first mini-batch): all-reduced gradients
            for ma, mb in zip(step_a, step_b):
                assert ma.keys() == mb.keys(), (name, set(ma) ^ set(mb))
                for key, v in ma.items():
                    assert mb[key] == pytest.approx(v, rel=1e-4, abs=1e-5), (name, key)
        assert b["weights"].keys() == a["weights"].keys()
        for k, w in a["weights"].items():
            assert b["weights"][k] == pytest.approx(w, rel=1e-6), (name, k)
        pa, pb = torch.tensor(a["params"]), torch.tensor(b["params"])
        assert (pa - pb).abs().max() < 2e-5, name
    # the policy did move, so equal parameters are not equal by standing still
    assert one["daro"]["weights"] != {k: 1.0 for k in one["daro"]["weights"]}


# FSDP runs compute in bfloat16 with tied embeddings: the checkpoint must still hold fp32 master weights
TRAIN_MODES = {
    "ddp": ["trainer.parallel=ddp"],
    "fsdp": ["trainer.parallel=fsdp", "model.dtype=bfloat16", "model.tie_embeddings=true"],
}


def _check_whole_batch_run(p, client, run, ckpt: Path, ov: list[str], parallel: str, steps: int) -> None:
    """A `torchrun ... daro-lab train` run on 2 gloo ranks: rank 0 alone reports and logs, one FINISHED MLflow run
    with the whole batch's metrics, a checkpoint holding both ranks' sampling streams. FSDP: the checkpoint is the
    full model in fp32 (master weights, though compute ran in bf16), tied embeddings once, loadable into a plain
    policy."""
    from daro_lab.config import load_config
    from daro_lab.trainer.checkpoint import load_checkpoint
    from daro_lab.trainer.setup import load_model_and_tokenizer

    assert p.stdout.count("finished") == 1  # rank 0 alone reports
    assert run.info.status == "FINISHED" and run.data.tags["daro_lab.world_size"] == "2"
    prompts = [m.value for m in client.get_metric_history(run.info.run_id, "rollout/prompts")]
    assert prompts == [8.0] * steps  # both ranks' 4 prompts, gathered
    assert any(k.startswith("daro/weight/mu_") for k in run.data.metrics)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["rollout_gens"].shape[0] == 2
    assert not torch.equal(state["rollout_gens"][0], state["rollout_gens"][1])  # each rank samples its own stream
    weights = load_file(ckpt / "model.safetensors")
    policy, _ = load_model_and_tokenizer(load_config(None, [*ov, "model.dtype=float32"]))
    load_checkpoint(ckpt, policy)  # every weight present (a tied alias may be stored once)
    assert policy.model.embed_tokens.weight.abs().sum() > 0
    if parallel == "fsdp":
        assert {t.dtype for t in weights.values()} == {torch.float32}
        assert policy.lm_head.weight is policy.model.embed_tokens.weight and len(weights) == len(
            dict(policy.named_parameters())
        )
        assert torch.equal(policy.model.embed_tokens.weight, weights["model.embed_tokens.weight"])


@pytest.mark.parametrize("parallel", TRAIN_MODES)
def test_torchrun_run_records_the_whole_batch_and_resumes_from_sigkill_like_an_uninterrupted_one(
    tmp_path, small_env, wait_for_checkpoint, parallel
):
    """`torchrun ... daro-lab train` on 2 gloo ranks records one run of the whole batch (`_check_whole_batch_run`);
    then SIGKILL to the whole job once the step-2 checkpoint exists, `torchrun daro-lab train --resume`: every
    later step's metrics equal those of the uninterrupted 2-rank run (each rank's sampling stream comes back from
    the checkpoint; FSDP: the full weights and AdamW states are re-sharded)."""

    from daro_lab.tracking import read_metrics
    from daro_lab.trainer.checkpoint import latest

    store = f"sqlite:///{tmp_path}/mlflow.db"
    # a cache of its own: the first torchrun run warm-starts the tiny model under torch.distributed
    # (rank 0 builds the entry; transformers writes no model files from the other ranks)
    env = [o for o in small_env if not o.startswith("model.cache_dir=")] + [f"model.cache_dir={tmp_path}/cache"]
    ov = [
        *env,
        *TRAIN_MODES[parallel],
        "algo.method=daro",
        "trainer.steps=4",
        "trainer.checkpoint_every=2",
        "trainer.threads=1",
        "trainer.log_checkpoint=false",
        f"tracking.uri={store}",
        f"trainer.checkpoint_dir={tmp_path}/ckpt",
    ]
    sets = [x for o in ov for x in ("--set", o)]
    p = _run([*TORCHRUN, "-m", "daro_lab.cli", "train", *sets, "--set", "tracking.run_name=whole"], tmp_path)
    client = open_client(store)
    exp = client.get_experiment_by_name("daro-lab").experiment_id
    (whole_run,) = client.search_runs([exp])
    _check_whole_batch_run(
        p,
        client,
        whole_run,
        latest(tmp_path / "ckpt" / whole_run.info.run_id),
        env + TRAIN_MODES[parallel],
        parallel,
        steps=4,
    )
    with procs.started(
        [*TORCHRUN, str(HERE / "_slow_train.py"), *ov, "tracking.run_name=killed"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        run_id, root = wait_for_checkpoint(client, "attributes.run_name = 'killed'", proc, 2)
        procs.kill_tree(proc.pid)  # torchrun and both ranks at once (the ranks run in sessions of their own)
        proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert latest(root).name == "step_000002"
    _run([*TORCHRUN, "-m", "daro_lab.cli", "train", "--resume", run_id, "--tracking-uri", store], tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
    whole = client.search_runs([exp], filter_string="attributes.run_name = 'whole'")[0].info.run_id

    def later(rid):
        df = read_metrics(store, rid)
        df = df[(df.step > 2) & ~df.key.str.startswith(("time/", "perf/"))]
        return df.set_index(["key", "step"]).value.sort_index()

    a, b = later(whole), later(run_id)
    assert len(a) > 20 and a.index.equals(b.index), set(a.index) ^ set(b.index)
    assert np.array_equal(a.values, b.values, equal_nan=True), a.compare(b)
