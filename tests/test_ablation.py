"""Ablations: grid files, the parent/child runs, the summary against what the children logged,
resume after a kill, crashed arms, and the Ray executor on a local instance."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _procs as procs
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from daro_lab.ablation import AblationError, load_grid, make_plan, run_ablation, summarize_ablation
from daro_lab.ablation.summary import (
    ACC,
    coefficient_of_variation,
    km_restricted_mean,
    mean_ci,
    noise_floor_cv,
    paired_test,
    run_stats,
    steps_to_target,
)
from daro_lab.cli import app
from daro_lab.tracking import open_client, read_metrics, read_table

pytestmark = pytest.mark.slow

GRID = """
description = "test grid"
reference = "learned"
seeds = [0, 1]
weight_stats = true
balance_window = 2

[[arms]]
name = "learned"
label = "DARO"
set = ["algo.method=daro"]

[[arms]]
name = "grpo"
set = ["algo.method=grpo"]

[[arms]]
name = "optimal"
set = ["algo.method=static"]
static_from = "learned"
"""


class chdir_to:
    """MLflow puts a new experiment's artifacts under ./mlruns of the process that creates it: keep
    them in the test's folder, not the repository."""

    def __init__(self, folder):
        self.folder, self.old = folder, None

    def __enter__(self):
        self.old = os.getcwd()
        os.chdir(self.folder)

    def __exit__(self, *exc):
        os.chdir(self.old)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An empty MLflow sqlite store, created once (creating one takes ~10 s), copied per test."""
    d = tmp_path_factory.mktemp("tmpl")
    with chdir_to(d):
        open_client(f"sqlite:///{d}/mlflow.db")
    return d / "mlflow.db"


def new_store(template_db, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, folder / "mlflow.db")
    return f"sqlite:///{folder}/mlflow.db"


def small(env, folder: Path, *extra):
    """The small preset as command-line overrides (the sweep's --set), checkpoints in `folder`."""
    return [*env, f"trainer.checkpoint_dir={folder}/ckpt", "trainer.log_checkpoint=false", *extra]


def write_grid(folder: Path, text: str, name: str = "g") -> Path:
    p = folder / f"{name}.toml"
    p.write_text(textwrap.dedent(text))
    return p


def all_runs(uri):
    c = open_client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps) if exps else []


# --------------------------------------------------------------------------------------------
# A tiny sweep: two seeds, three arms (learned DARO, GRPO, and DARO frozen at the learned weights)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, template_db, small_env):
    d = tmp_path_factory.mktemp("sweep")
    uri = new_store(template_db, d)
    grid = write_grid(d, GRID)
    with chdir_to(d):
        res = run_ablation(grid, preset="arithmetic", steps=2, overrides=small(small_env, d), tracking_uri=uri)
    return uri, res


def test_sweep_creates_parent_and_tagged_children(sweep):
    uri, res = sweep
    c = open_client(uri)
    parent = c.get_run(res.parent_run_id)
    assert res.status == "FINISHED" and parent.info.status == "FINISHED"
    assert parent.data.tags["daro_lab.ablation"] == "g"
    assert parent.data.tags["daro_lab.role"] == "ablation-parent"
    exp = c.get_experiment(parent.info.experiment_id).name
    assert exp == "daro-lab-ablation-g-arithmetic"
    children = [r for r in all_runs(uri) if r.info.run_id != res.parent_run_id]
    assert len(children) == 6
    seen = set()
    for r in children:
        t = r.data.tags
        assert t["mlflow.parentRunId"] == res.parent_run_id
        assert t["daro_lab.ablation"] == "g"
        assert r.info.status == "FINISHED"
        assert r.info.run_name == f"{t['daro_lab.arm']}-seed{t['daro_lab.seed']}"
        assert r.data.params["seed"] == t["daro_lab.seed"]
        seen.add((t["daro_lab.arm"], int(t["daro_lab.seed"])))
    assert seen == {(a, s) for a in ("learned", "grpo", "optimal") for s in (0, 1)}
    # jobs run seed by seed, arms in grid order: learned DARO before the arm that freezes its weights
    order = [
        (r.data.tags["daro_lab.seed"], r.data.tags["daro_lab.arm"])
        for r in sorted(children, key=lambda r: r.info.start_time)
    ]
    assert order == [
        ("0", "learned"),
        ("0", "grpo"),
        ("0", "optimal"),
        ("1", "learned"),
        ("1", "grpo"),
        ("1", "optimal"),
    ]


def test_optimal_static_arm_uses_the_final_weights_of_learned_daro(sweep):
    uri, res = sweep
    ps = res.per_seed.set_index(["arm", "seed"])
    c = open_client(uri)
    for seed in (0, 1):
        learned, optimal = ps.loc[("learned", seed), "run_id"], ps.loc[("optimal", seed), "run_id"]
        m = read_metrics(uri, learned)
        w = m[m.key.str.startswith("daro/weight/")].sort_values("step").groupby("key").value.last()
        final = {int(k.split("mu_")[1].split("of")[0]): v for k, v in w.items()}
        run = c.get_run(optimal)
        assert run.data.tags["daro_lab.static_from"] == learned
        tagged = {int(k): v for k, v in json.loads(run.data.tags["daro_lab.static_weights"]).items()}
        assert tagged == pytest.approx(final)
        assert run.data.params["algo.method"] == "static"
        # the frozen run logged exactly those weights at every step
        mo = read_metrics(uri, optimal)
        for k, v in final.items():
            vals = mo[mo.key == f"daro/weight/mu_{k}of4"].value
            assert len(vals) and np.allclose(vals, v, rtol=1e-5)
        assert json.loads(Path(run.data.params["algo.daro.static"]).read_text()) == pytest.approx(
            {str(k): v for k, v in final.items()}
        )


def _balance(m, prefix, window):
    """CV across groups of |each group's mean over the last `window` steps|."""
    d = m[m.key.str.startswith(prefix + "/mu_")]
    last = d.step.max()
    v = np.abs(d[d.step > last - window].groupby("key").value.mean().to_numpy())
    return float(v.std() / v.mean()) if len(v) >= 2 and v.mean() > 0 else math.nan


def test_summary_equals_what_the_children_logged(sweep):
    from scipy import stats

    uri, res = sweep
    c = open_client(uri)
    per_arm = {}
    for r in all_runs(uri):
        if r.info.run_id == res.parent_run_id:
            continue
        arm, seed = r.data.tags["daro_lab.arm"], int(r.data.tags["daro_lab.seed"])
        m = read_metrics(uri, r.info.run_id)
        acc = m[m.key == "eval/greedy_acc"].sort_values("step")
        assert list(acc.step) == [0, 2]
        prefix = "contrib" if arm == "grpo" else "daro/wS"
        per_arm.setdefault(arm, {})[seed] = {
            "final": acc.value.iloc[-1],
            "best": acc[acc.step >= 1].value.max(),
            "balance": _balance(m, prefix, 2),
        }
    s = res.summary.set_index("arm")
    for arm, seeds in per_arm.items():
        for q, col in (("final", "final_acc"), ("best", "best_acc"), ("balance", "balance_cv")):
            vals = [seeds[0][q], seeds[1][q]]
            finite = [v for v in vals if np.isfinite(v)]
            assert s.loc[arm, f"{col}_mean"] == pytest.approx(np.mean(finite) if finite else math.nan, nan_ok=True)
            lo, hi = s.loc[arm, f"{col}_lo"], s.loc[arm, f"{col}_hi"]
            if not np.isfinite(vals).all():  # e.g. no step with two groups present: no balance, no CI
                assert math.isnan(lo) and math.isnan(hi)
            elif vals[0] != vals[1]:  # the t-interval of the mean of two seeds, the range apart
                half = stats.t.ppf(0.975, 1) * np.std(vals, ddof=1) / np.sqrt(2)
                assert (lo, hi) == pytest.approx((np.mean(vals) - half, np.mean(vals) + half))
                assert (s.loc[arm, f"{col}_min"], s.loc[arm, f"{col}_max"]) == (min(vals), max(vals))
            else:
                assert lo == hi == vals[0]
        assert s.loc[arm, "n_seeds"] == 2
    # paired t-test against the reference, by seed
    for arm in ("grpo", "optimal"):
        a = [per_arm[arm][i]["final"] for i in (0, 1)]
        b = [per_arm["learned"][i]["final"] for i in (0, 1)]
        d = np.subtract(a, b)
        assert s.loc[arm, "final_acc_diff"] == pytest.approx(d.mean())
        if np.all(d == 0):
            assert s.loc[arm, "final_acc_p"] == 1.0
        elif np.ptp(d) == 0:
            assert math.isnan(s.loc[arm, "final_acc_p"])
        else:
            assert s.loc[arm, "final_acc_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert s.loc[arm, "test"] == "paired t-test"
    assert math.isnan(s.loc["learned", "final_acc_p"]) and bool(s.loc["learned", "reference"])
    # steps to target (the default 'progress'): 80% of the way from the mean start to the best arm's mean final
    starts = [read_metrics(uri, r.info.run_id) for r in all_runs(uri) if r.info.run_id != res.parent_run_id]
    start = np.mean([m[(m.key == "eval/greedy_acc") & (m.step == 0)].value.iloc[0] for m in starts])
    best = max(np.mean([per_arm[a][i]["final"] for i in (0, 1)]) for a in per_arm)
    target = start + 0.8 * (best - start) if best > start else best
    assert s.loc["grpo", "target_acc"] == pytest.approx(target)
    # the balance quantities differ between DARO's path (w signal / C) and GRPO (C_mu): never tested against each other
    assert math.isnan(s.loc["grpo", "balance_cv_p"]) and s.loc["grpo", "balance_source"] == "C"
    # weight statistics (weight_stats = true): learned DARO has weights, GRPO none
    assert np.isfinite(s.loc["learned", "weight_var_mean"]) and s.loc["learned", "nonfinite"] == "0/2"
    assert s.loc["grpo", "at_bound"] == "n/a"
    # stored on the parent run: parquet tables and markdown, equal to what was returned
    stored = read_table(uri, res.parent_run_id, "ablation_summary").set_index("arm")
    assert stored.loc["grpo", "final_acc_mean"] == pytest.approx(s.loc["grpo", "final_acc_mean"])
    md = Path(c.download_artifacts(res.parent_run_id, "ablation_summary.md")).read_text()
    assert "| **learned** (DARO [" in md and "paired t-test" in md  # the label names the reading
    # recomputed from the store alone, it is the same
    again = summarize_ablation(uri, res.parent_run_id).summary.set_index("arm")
    assert again.loc["optimal", "balance_cv_mean"] == pytest.approx(s.loc["optimal", "balance_cv_mean"], nan_ok=True)
    # one level's accuracy as the endpoint (grid key accuracy = 'greedy:level_N'): read from that level's metric
    level = max(
        int(k.rsplit("_", 1)[1])
        for k in read_metrics(uri, res.per_seed.run_id.iloc[0]).key
        if k.startswith("eval/greedy_acc/level_")
    )
    lv = summarize_ablation(uri, res.parent_run_id, accuracy=f"greedy:level_{level}")
    for r in lv.per_seed.itertuples():
        m = read_metrics(uri, r.run_id)
        acc = m[m.key == f"eval/greedy_acc/level_{level}"].sort_values("step")
        assert r.final_acc == pytest.approx(acc.value.iloc[-1]) and r.start_acc == pytest.approx(acc.value.iloc[0])
    assert f"on the level-{level} prompts only (eval/greedy_acc/level_{level})" in lv.markdown
    assert lv.plan.accuracy == f"greedy:level_{level}" and res.plan.accuracy == "greedy"
    with pytest.raises(AblationError, match="accuracy: expected 'greedy', 'sampled'.*got 'level_5'"):
        summarize_ablation(uri, res.parent_run_id, accuracy="level_5")
    with pytest.raises(AblationError, match="not stored"):
        summarize_ablation(uri, res.parent_run_id, accuracy="greedy", write=True)


# --------------------------------------------------------------------------------------------
# Killed halfway (SIGKILL: parent and child left RUNNING), then resumed


KILL_SCRIPT = """
import os, sys, time
from daro_lab.ablation import run_ablation
from daro_lab.hooks import Hook, default_hooks

MARKER = {marker!r}

class Hang(Hook):
    def __init__(self, tracker):
        self.tracker = tracker
    def on_step_end(self, step, metrics):
        if step == 3:  # the step-2 checkpoint is on disk; wait here to be killed
            open(MARKER, "w").write(self.tracker.run_id)
            time.sleep(600)

def hooks(tracker):
    arm = tracker.client.get_run(tracker.run_id).data.tags.get("daro_lab.arm")
    return default_hooks(tracker) + ([Hang(tracker)] if arm == "b" else [])

run_ablation({grid!r}, preset="arithmetic", steps=3, overrides={overrides!r}, tracking_uri={uri!r}, hooks=hooks,
             echo=lambda m: print(m, flush=True))
"""


def test_killed_sweep_resumes_without_rerunning_finished_arms(tmp_path, template_db, small_env):
    uri = new_store(template_db, tmp_path)
    grid = write_grid(
        tmp_path,
        """
        reference = "a"
        seeds = [0]
        [[arms]]
        name = "a"
        set = ["algo.method=grpo"]
        [[arms]]
        name = "b"
        set = ["algo.method=dapo"]
        [[arms]]
        name = "c"
        set = ["algo.method=dr_grpo"]
    """,
    )
    marker = tmp_path / "hung"
    script = tmp_path / "kill_me.py"
    script.write_text(
        KILL_SCRIPT.format(marker=str(marker), grid=str(grid), overrides=small(small_env, tmp_path), uri=uri)
    )
    with procs.started(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    ) as proc:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the sweep never reached arm b's step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    c = open_client(uri)
    before = {r.data.tags["daro_lab.arm"]: r for r in all_runs(uri) if "daro_lab.arm" in r.data.tags}
    assert set(before) == {"a", "b"}
    assert before["a"].info.status == "FINISHED" and before["b"].info.status == "RUNNING"
    parent_id = before["a"].data.tags["mlflow.parentRunId"]
    assert c.get_run(parent_id).info.status == "RUNNING"

    res = run_ablation("g", resume=parent_id, tracking_uri=uri)

    assert res.status == "FINISHED" and c.get_run(parent_id).info.status == "FINISHED"
    after = [r for r in all_runs(uri) if "daro_lab.arm" in r.data.tags]
    assert sorted(r.data.tags["daro_lab.arm"] for r in after) == ["a", "b", "c"], "a duplicate or missing child"
    by_arm = {r.data.tags["daro_lab.arm"]: r for r in after}
    a = by_arm["a"]
    assert a.info.run_id == before["a"].info.run_id
    assert (a.info.start_time, a.info.end_time) == (before["a"].info.start_time, before["a"].info.end_time)
    assert "daro_lab.resumes" not in a.data.tags
    b = by_arm["b"]  # continued from its step-2 checkpoint, in the same run
    assert b.info.run_id == before["b"].info.run_id and b.info.status == "FINISHED"
    assert json.loads(b.data.tags["daro_lab.resumes"])[0]["step"] == 2
    acc = read_metrics(uri, b.info.run_id, ["eval/greedy_acc"])
    assert list(acc.step) == [0, 2, 3]
    assert by_arm["c"].info.status == "FINISHED"
    assert {r.action for r in res.results} == {"kept", "resumed", "ran"}
    assert list(res.summary.n_seeds) == [1, 1, 1]


def test_resume_restarts_a_running_child_that_has_no_checkpoint(tmp_path, template_db, small_env):
    """A child killed before its first checkpoint: deleted (tagged superseded) and run afresh."""
    from daro_lab.record import TAG_SUPERSEDED
    from daro_lab.tracking import Tracker

    uri = new_store(template_db, tmp_path)
    grid = write_grid(
        tmp_path,
        """
        seeds = [0]
        [[arms]]
        name = "only"
        set = ["algo.method=grpo"]
    """,
    )
    plan = make_plan(grid, "arithmetic", steps=2, overrides=small(small_env, tmp_path))
    parent = Tracker.start(
        uri,
        plan.experiment,
        "ablation-g",
        {},
        plan.to_json(),
        tags={"daro_lab.ablation": "g", "daro_lab.role": "ablation-parent"},
    )
    stale = Tracker.start(
        uri,
        plan.experiment,
        "only-seed0",
        {},
        "{}",
        parent_run_id=parent.run_id,
        tags={"daro_lab.ablation": "g", "daro_lab.arm": "only", "daro_lab.seed": "0"},
    )
    res = run_ablation(None, resume=parent.run_id, tracking_uri=uri)
    c = open_client(uri)
    gone = c.get_run(stale.run_id)
    assert gone.info.lifecycle_stage == "deleted" and TAG_SUPERSEDED in gone.data.tags
    (child,) = [r for r in all_runs(uri) if r.data.tags.get("daro_lab.arm") == "only"]
    assert child.info.run_id != stale.run_id and child.info.status == "FINISHED"
    assert res.status == "FINISHED"


# --------------------------------------------------------------------------------------------
# Bad grids: clear errors naming the file and key, before any run exists


@pytest.mark.parametrize(
    "text,needle",
    [
        ("refrence = 'a'\n[[arms]]\nname = 'a'\n", "unknown grid key 'refrence'"),
        ("[[arms]]\nname = 'a'\nsett = ['algo.method=grpo']\n", "arms[0] ('a'): unknown grid key 'sett'"),
        ("[[arms]]\nlabel = 'a'\n", "arms[0]: missing grid key 'name'"),
        ("test = 'anova'\n[[arms]]\nname = 'a'\n", "grid key 'test': expected 't' or 'wilcoxon', got 'anova'"),
        ("accuracy = 'best'\n[[arms]]\nname = 'a'\n", "key 'accuracy': expected 'greedy', 'sampled', 'greedy:level_N'"),
        ("accuracy = 'sampled:level_x'\n[[arms]]\nname = 'a'\n", "key 'accuracy': expected 'greedy'"),
        ("num_cpus = 0\n[[arms]]\nname = 'a'\n", "grid key 'num_cpus': must be a finite number > 0, got 0.0"),
        ("target_acc = 'final'\n[[arms]]\nname = 'a'\n", "grid key 'target_acc': expected a number or 'progress'"),
        ("init_seed = 'each'\n[[arms]]\nname = 'a'\n", "grid key 'init_seed': expected 'shared' or 'per_seed'"),
        ("seeds = [0, true]\n[[arms]]\nname = 'a'\n", "grid key 'seeds[1]': expected an integer, got True"),
        ("[[arms]]\nname = 'a'\nset = ['algo.daro.lrw=1e-3']\n", "arm 'a': unknown config key 'algo.daro.lrw'"),
        (
            "[[arms]]\nname = 'a'\nset = ['algo.method=ppo']\n",
            "arm 'a': config key 'algo.method': unknown method 'ppo'",
        ),
        ("arms = []\n", "the grid is empty"),
        ("description = 'nothing'\n", "the grid is empty"),
        ("reference = 'x'\n[[arms]]\nname = 'a'\n", "key 'reference': no arm named 'x'"),
        (
            "[[arms]]\nname = 'o'\nset = ['algo.method=static']\nstatic_from = 'l'\n[[arms]]\nname = 'l'\n",
            "must come before this arm",
        ),
        ("[[arms]]\nname = 'a'\nset = ['trainer.prompts_per_step*=1.3']\n", "is an integer"),
        ("seeds = 0\n[[arms]]\nname = 'a'\n", "key 'seeds' must be >= 1"),
        (
            "seeds = [-1, 2]\n[[arms]]\nname = 'a'\n",
            "key 'seeds': seeds must be integers in [0, 2^63) (config key 'seed'), got -1",
        ),
    ],
)
def test_bad_grid_is_a_clear_error_naming_file_and_key(tmp_path, text, needle):
    grid = write_grid(tmp_path, text, "bad")
    with pytest.raises(AblationError) as e:
        make_plan(grid, "tiny")
    assert needle in str(e.value) and str(grid) in str(e.value)


def test_bad_grid_on_the_command_line_exits_2_and_creates_no_run(tmp_path, template_db):
    uri = new_store(template_db, tmp_path)
    grid = write_grid(tmp_path, "arms = []\n", "empty")
    res = CliRunner().invoke(app, ["run", "ablation", str(grid), "--tracking-uri", uri])
    assert res.exit_code == 2 and "the grid is empty" in res.output and "empty.toml" in res.output
    res = CliRunner().invoke(app, ["run", "ablation", "no-such-grid", "--tracking-uri", uri])
    assert res.exit_code == 2 and "no ablation grid 'no-such-grid'" in res.output
    res = CliRunner().invoke(app, ["run", "ablation", "weight-lr", "--tracking-uri", uri, "--set", "algo.daro.lr_w=1"])
    assert res.exit_code == 2 and "arm 'lr_w-1e-4'" in res.output
    res = CliRunner().invoke(
        app, ["run", "ablation", "methods", "--preset", "paper/no-such-model", "--tracking-uri", uri]
    )
    assert res.exit_code == 2 and "paper/no-such-model/daro.toml" in res.output
    grid = write_grid(tmp_path, "seeds = [-1, 2]\n[[arms]]\nname = 'a'\n", "negative")
    res = CliRunner().invoke(app, ["run", "ablation", str(grid), "--tracking-uri", uri])
    assert res.exit_code == 2 and "got -1" in res.output
    res = CliRunner().invoke(app, ["run", "ablation", "methods", "--workers", "-3", "--tracking-uri", uri])
    assert res.exit_code == 2 and "workers: expected an integer >= 1" in res.output and "-3" in res.output
    assert all_runs(uri) == []


def test_every_shipped_grid_resolves_against_the_tiny_preset():
    for name in ("static-weights", "k", "weight-lr", "weight-reg", "weight-signal", "weight-param", "methods"):
        plan = make_plan(name, "tiny")
        assert plan.reference in [a.name for a in plan.arms] and len(plan.seeds) == 3
        assert make_plan(name, "arithmetic").arms[0].config["task"]["name"] == "arithmetic"
    reg = {a.name: a.config["algo"]["daro"] for a in make_plan("weight-reg", "tiny").arms}
    assert (reg["abs-1"]["signal"], reg["abs-1"]["reg"]) == ("abs", 1.0) and reg["mass-auto"]["reg"] == "auto"
    static = {a.name: a.config["algo"]["daro"]["static"] for a in make_plan("static-weights", "tiny").arms}
    assert static["frozen-ones"] == "ones" and static["frozen-drgrpo"] == "shape:dr_grpo"
    assert make_plan("methods", "tiny").accuracy == "sampled"
    k = {a.name: a.config for a in make_plan("k", "tiny").arms}
    budget = {n: c["rollout"]["num_responses"] * c["trainer"]["prompts_per_step"] for n, c in k.items()}
    assert budget["K4-matched-budget"] == budget["K8"] == budget["K16-matched-budget"]
    assert {c["trainer"]["prompts_per_step"] for n, c in k.items() if "prompts" in n or n == "K8"} == {
        k["K8"]["trainer"]["prompts_per_step"]
    }
    assert load_grid("static-weights").arm("optimal-static").static_from == "learned"
    mix = make_plan("level-mix", "tiny")
    assert mix.accuracy == "sampled:level_5" and mix.init_seed == "per_seed" and len(mix.seeds) == 16
    assert {
        a.config["task"]["level_mix"] == [8, 4, 2, 1] and a.config["trainer"]["threads"] == 1 for a in mix.arms
    } == {True}
    assert {a.name: a.config["algo"]["daro"]["signal_ema"] for a in mix.arms}["daro-abs"] == 0.9


# --------------------------------------------------------------------------------------------
# A crashing arm: FAILED, and the others go on


def test_crashed_arms_are_failed_and_the_others_go_on(tmp_path, template_db, small_env):
    uri = new_store(template_db, tmp_path)
    grid = write_grid(
        tmp_path,
        """
        reference = "ok"
        seeds = [0]
        weight_stats = true
        [[arms]]
        name = "diverges"
        set = ["algo.method=daro", "algo.daro.lr_w=1e308"]  # finite (inf is refused), the weights overflow at once
        [[arms]]
        name = "bad-static"
        set = ["algo.method=static", "algo.daro.static=/no/such/weights.json"]
        [[arms]]
        name = "ok"
        set = ["algo.method=daro"]
    """,
    )
    res = run_ablation(grid, preset="arithmetic", steps=2, overrides=small(small_env, tmp_path), tracking_uri=uri)
    c = open_client(uri)
    assert res.status == "FAILED"
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["daro_lab.arms_failed"] == "diverges/seed0, bad-static/seed0"
    runs = {r.data.tags["daro_lab.arm"]: r for r in all_runs(uri) if "daro_lab.arm" in r.data.tags}
    assert {a: r.info.status for a, r in runs.items()} == {
        "diverges": "FAILED",
        "bad-static": "FAILED",
        "ok": "FINISHED",
    }
    tb = Path(c.download_artifacts(runs["diverges"].info.run_id, "traceback.txt")).read_text()
    assert "FloatingPointError" in tb
    # failed before its run existed (the weights file is missing): still a FAILED child with the traceback
    tb = Path(c.download_artifacts(runs["bad-static"].info.run_id, "traceback.txt")).read_text()
    assert "/no/such/weights.json" in tb
    assert runs["bad-static"].data.tags["mlflow.parentRunId"] == res.parent_run_id
    s = res.summary.set_index("arm")
    assert s.loc["diverges", "n_seeds"] == 0 and s.loc["diverges", "failed"] == 1
    assert s.loc["diverges", "nonfinite"] == "1/1"
    assert s.loc["ok", "n_seeds"] == 1 and np.isfinite(s.loc["ok", "final_acc_mean"])
    assert math.isnan(s.loc["ok", "final_acc_lo"]), "one seed: no confidence interval"
    assert "diverges seed 0: FAILED" in res.markdown and "One seed" in res.markdown


# --------------------------------------------------------------------------------------------
# Ray: each arm a task on a local instance


def test_ray_executor_on_a_local_instance(tmp_path, template_db, small_env):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'daro-lab[ray]'")
    uri = new_store(template_db, tmp_path)
    grid = write_grid(
        tmp_path,
        """
        seeds = [0]
        num_cpus = 1
        [[arms]]
        name = "daro"
        set = ["algo.method=daro"]
        [[arms]]
        name = "grpo"
        set = ["algo.method=grpo"]
    """,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        unpinned = [o for o in small(small_env, tmp_path) if not o.startswith("trainer.threads=")]  # the sweep sets it
        res = run_ablation(grid, preset="arithmetic", steps=2, overrides=unpinned, tracking_uri=uri, executor="ray")
    finally:
        ray.shutdown()
    assert res.status == "FINISHED"
    runs = [r for r in all_runs(uri) if "daro_lab.arm" in r.data.tags]
    assert sorted(r.data.tags["daro_lab.arm"] for r in runs) == ["daro", "grpo"]
    assert all(r.info.status == "FINISHED" and r.data.params["trainer.threads"] == "1" for r in runs)
    assert open_client(uri).get_run(res.parent_run_id).data.params["ablation.executor"] == "ray"


# --------------------------------------------------------------------------------------------
# The statistics on known numbers


def test_statistics_on_known_numbers():
    import pandas as pd
    from scipy import stats

    rows = []
    for step, wl in ((1, [0.5, 1.0, 1.5]), (2, [1.0, 1.0]), (3, [2.0, -2.0, 4.0])):  # step 2: one group absent
        rows += [{"key": f"daro/wL/mu_{k}of4", "step": step, "value": v} for k, v in zip((1, 2, 3), wl)]
        rows += [{"key": f"daro/weight/mu_{k}of4", "step": step, "value": 1.0 + k} for k in (1, 2, 3)]
        rows.append({"key": "daro/at_bound", "step": step, "value": float(step == 2)})
    rows += [{"key": "eval/greedy_acc", "step": s, "value": v} for s, v in ((0, 0.1), (2, 0.4), (3, 0.3))]
    rows.append({"key": "loss/total", "step": 3, "value": float("nan")})
    m = pd.DataFrame(rows)
    out = run_stats(m, "daro", window=2, weight_stats=True)
    assert (out["start_acc"], out["final_acc"], out["best_acc"]) == (0.1, 0.3, 0.4)
    # per group, the mean over steps 2 and 3 (k = 3 is absent at step 2); then the CV of their absolute values
    means = np.abs([(1.0 + 2.0) / 2, (1.0 - 2.0) / 2, 4.0])
    assert out["balance_cv"] == pytest.approx(means.std() / means.mean())
    assert out["balance_source"] == "wL" and out["balance_groups"] == 3
    assert out["balance_floor"] == pytest.approx(noise_floor_cv(3))
    assert out["weight_var"] == pytest.approx(np.var([2.0, 3.0, 4.0]))
    assert out["balance_gap"] == pytest.approx(np.mean(np.abs(np.abs([1.0, 1.0, 2.0, -2.0, 4.0]) - 1)))
    assert out["at_bound"] == 1 and out["nonfinite"] == 1
    assert coefficient_of_variation([3.0]) != coefficient_of_variation([3.0])  # NaN: one group
    # the noise floor: CV of |x| for zero-mean x tends to sqrt(pi/2 - 1) for many groups
    assert noise_floor_cv(200) == pytest.approx(math.sqrt(math.pi / 2 - 1), rel=0.01)
    assert 0.4 < noise_floor_cv(2) < noise_floor_cv(7) < 0.76  # 0.44 for two groups, 0.68 for seven
    # steps to target, censored: reached at 20 and 40, one seed never (last evaluation 100): the Kaplan-Meier
    # restricted mean counts it to 100 (the mean over survivors, 30, would flatter the arm)
    assert km_restricted_mean([20, 40, 100], [True, True, False]) == pytest.approx((20 + 40 + 100) / 3)
    assert km_restricted_mean([20, 40], [True, True]) == pytest.approx(30.0)
    # a censoring before the largest time: survival steps down by 1/(at risk) at each later event
    assert km_restricted_mean([10, 30, 50], [False, True, True]) == pytest.approx(10 + 20 * 1.0 + 20 * 0.5)
    acc = pd.DataFrame({"key": ACC, "step": [0, 10, 20], "value": [0.1, 0.2, 0.3]})
    assert steps_to_target(acc, 0.25) == (20.0, True) and steps_to_target(acc, 0.9) == (20.0, False)
    # mean and CI: one value has no interval; equal values a zero-width one
    assert mean_ci([0.5])[:3] == (0.5, pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))
    assert mean_ci([0.2, 0.2, float("nan")]) == (0.2, 0.2, 0.2, 2)
    # the t-interval by hand; a bootstrap of fewer than 5 values (their range) is refused
    v = [0.61, 0.64, 0.67]
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert mean_ci(v)[1:3] == pytest.approx((np.mean(v) - half, np.mean(v) + half))
    with pytest.raises(ValueError, match="bootstrap interval of a mean of 3 values is their range"):
        mean_ci(v, method="bootstrap")
    assert mean_ci([0.1, 0.3, 0.2, 0.5, 0.4], method="bootstrap")[3] == 5
    # paired tests
    a, b = [0.5, 0.6, 0.7, 0.65], [0.4, 0.55, 0.5, 0.6]
    diff, p, n = paired_test(a, b, "t")
    assert (diff, p, n) == (pytest.approx(np.mean(np.subtract(a, b))), pytest.approx(stats.ttest_rel(a, b).pvalue), 4)
    assert paired_test(a, b, "wilcoxon")[1] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert math.isnan(paired_test([0.5], [0.4])[1])  # one pair: no p-value
    assert paired_test([0.5, 0.6], [0.5, 0.6])[1] == 1.0  # no difference at all


def test_report_of_the_ablation_through_the_analyses(sweep, tmp_path):
    pytest.importorskip("analyses.report")
    from daro_lab.ablation.report import write_ablation_report

    uri, res = sweep
    rep, again = write_ablation_report(
        uri, res.parent_run_id, tmp_path / "rep", figures=["convergence"], against=["grpo"]
    )
    page = Path(rep.html).read_text()
    assert "<section id='ablation'>" in page and "Ablation summary" in page
    assert "daro-lab ablation &#x27;g&#x27;" in page or "daro-lab ablation 'g'" in page  # the report's title
    assert page.index("id='ablation'") < page.index("id='results'")
    for arm in ("learned", "grpo", "optimal"):
        assert f"<code>{arm}</code>" in page
    assert (tmp_path / "rep" / "ablation_summary.md").read_text() == again.markdown
    assert len(rep.results), "the analyses' results table is empty"
    # one steps-to-target definition: the figure's panel (d) uses the summary's target
    assert rep.figures["convergence"].summary["target"] == pytest.approx(again.summary.attrs["target_acc"])
    # every arm also paired against another (--against grpo): its differences are the per-seed differences to grpo
    vs = pd.read_csv(tmp_path / "rep" / "ablation_summary_vs_grpo.csv").set_index("arm")
    per = again.per_seed.pivot(index="seed", columns="arm", values="final_acc")
    assert bool(vs.loc["grpo", "reference"]) and vs.loc["learned", "final_acc_diff"] == pytest.approx(
        (per["learned"] - per["grpo"]).mean()
    )
    assert "reference arm `grpo`" in (tmp_path / "rep" / "ablation_summary_vs_grpo.md").read_text()
    with pytest.raises(AblationError, match="--against: no arm named 'nope'"):
        write_ablation_report(uri, res.parent_run_id, tmp_path / "rep2", figures=["convergence"], against=["nope"])
    assert not (tmp_path / "rep2").exists()  # refused before anything was written


def test_report_of_a_one_level_endpoint_draws_that_level_to_the_summarys_target(sweep, tmp_path, monkeypatch):
    """A grid whose accuracy is one level's ('greedy:level_N'): the convergence figure's steps to target are of that
    level, to the summary's target (the stored plan of the fixture's sweep is 'greedy': the summary it gets is the
    one-level summary of the same runs)."""
    pytest.importorskip("analyses.report")
    import daro_lab.ablation.report as report

    uri, res = sweep
    level = max(
        int(k.rsplit("_", 1)[1])
        for k in read_metrics(uri, res.per_seed.run_id.iloc[0]).key
        if k.startswith("eval/greedy_acc/level_")
    )
    real = report.summarize_ablation

    def one_level(uri_, parent, plan=None, accuracy=None, **kw):
        return real(uri_, parent, plan, accuracy=accuracy or f"greedy:level_{level}", **kw)

    monkeypatch.setattr(report, "summarize_ablation", one_level)
    rep, lv = report.write_ablation_report(uri, res.parent_run_id, tmp_path / "rep", figures=["convergence"])
    conv = rep.figures["convergence"]
    assert conv.summary == {
        "target": pytest.approx(lv.summary.attrs["target_acc"]),
        "accuracy": f"greedy:level_{level}",
    }
    steps = conv.tables["convergence_steps"]
    assert list(steps.target) == pytest.approx([lv.summary.attrs["target_acc"]] * len(steps))
    assert (tmp_path / "rep" / "ablation_summary_all_levels.md").is_file()  # all levels beside the endpoint


def test_command_line_runs_a_sweep_and_prints_the_summary(tmp_path, template_db, small_env):
    uri = new_store(template_db, tmp_path)
    grid = write_grid(
        tmp_path,
        """
        seeds = [3]
        [[arms]]
        name = "solo"
        set = ["algo.method=grpo"]
    """,
    )
    sets = [x for o in small(small_env, tmp_path) for x in ("--set", o)]
    res = CliRunner().invoke(
        app,
        [
            "run",
            "ablation",
            str(grid),
            "--steps",
            "1",
            "--tracking-uri",
            uri,
            "--no-report",
            "--preset",
            "arithmetic",
            *sets,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| **solo**" in res.output and "One seed: no confidence intervals" in res.output
    (child,) = [r for r in all_runs(uri) if r.data.tags.get("daro_lab.arm") == "solo"]
    assert child.data.params["seed"] == "3" and child.data.params["trainer.steps"] == "1"


def test_mlflow_ui_lists_the_child_runs_in_headless_chromium(sweep, tmp_path):
    """`daro-lab ui` serves the ablation; headless Chromium opens its experiment, expands the parent
    and the page lists every child run (one per arm and seed)."""
    pytest.importorskip("playwright.sync_api", reason="the ui-check extra (playwright) is not installed")
    from analyses.mlflow_ui import ablation_page, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    uri, res = sweep
    shot = tmp_path / "ui.png"
    names = ablation_page(uri, res.parent_run_id, shot)
    want = {r.info.run_name for r in all_runs(uri) if r.info.run_id != res.parent_run_id}
    assert len(want) == 6 and set(names) == want
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_summary_counts_censored_seeds_and_prints_the_noise_floor():
    import pandas as pd

    from daro_lab.ablation.summary import display_table, summarize

    per_seed = pd.DataFrame(
        {
            "arm": ["a"] * 3 + ["b"] * 3,
            "seed": [0, 1, 2] * 2,
            "status": "FINISHED",
            "final_acc": [0.5, 0.6, 0.7, 0.4, 0.5, 0.6],
            "best_acc": 0.7,
            "steps_to_target": [20.0, 40.0, 100.0, 30.0, 30.0, 30.0],
            "reached": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
            "balance_cv": [0.05, 0.07, 0.06, 0.7, 0.8, 0.75],
            "balance_floor": noise_floor_cv(7),
        }
    )
    s = summarize(per_seed, ["a", "b"], reference="b").set_index("arm")
    assert s.loc["a", "steps_to_target_mean"] == pytest.approx(160 / 3)  # not 30, the mean over survivors
    assert s.loc["a", "steps_to_target_reached"] == "2/3" and bool(s.loc["a", "steps_to_target_censored"])
    assert not s.loc["b", "steps_to_target_censored"] and s.loc["b", "steps_to_target_mean"] == 30.0
    cells = display_table(s.reset_index())
    assert cells["steps to target (reached)"].iloc[0].startswith("≥ 53.3")
    assert cells["own balance CV (of; noise floor)"].iloc[0].endswith(f"; {noise_floor_cv(7):.2f})")
    assert cells["final acc, seed range"].iloc[0] == "0.500–0.700"


def test_minimal_detectable_difference_has_80_percent_power_by_simulation():
    """paired_mdd is the difference a two-sided paired t-test at alpha 0.05 detects 80% of the time: simulated with
    pairs whose differences have the sd measured and a true difference equal to the MDD (sd known: the formula's)."""
    from scipy import stats

    from daro_lab.ablation.summary import paired_mdd, pairs_for_mdd

    rng = np.random.default_rng(0)
    n, sd = 10, 0.03
    mdd = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    hits = 0
    for _ in range(4000):
        d = rng.normal(mdd, sd, n)
        hits += stats.ttest_1samp(d, 0).pvalue < 0.05
    assert 0.77 < hits / 4000 < 0.86, hits / 4000  # 80% up to the t-approximation of the noncentral t
    a = rng.normal(0.6, 0.05, 6)
    b = a - rng.normal(0.01, sd, 6)
    d = a - b
    assert paired_mdd(a, b) == pytest.approx(
        (stats.t.ppf(0.975, 5) + stats.t.ppf(0.8, 5)) * d.std(ddof=1) / math.sqrt(6)
    )
    assert math.isnan(paired_mdd([0.5], [0.4]))
    assert math.isnan(paired_mdd([0.5, 0.6], [0.5, 0.6]))  # identical pairs: no variance, no MDD
    # the numbers: a paired sd of 0.03 needs tens of seeds for a 0.015 effect
    assert 20 < pairs_for_mdd(0.03, 0.015) < 40 and pairs_for_mdd(0.03, 0.1) == 3


def test_auc_and_group_shares_are_computed_from_the_curves_and_tables():
    from daro_lab.ablation.summary import area_under_curve, share_cv

    steps, acc = np.array([0.0, 10, 20, 40]), np.array([0.4, 0.5, 0.6, 0.6])
    want = ((0.4 + 0.5) / 2 * 10 + (0.5 + 0.6) / 2 * 10 + 0.6 * 20) / 40
    assert area_under_curve(steps, acc) == pytest.approx(want)
    assert math.isnan(area_under_curve(np.array([5.0]), np.array([0.5])))
    by_k = pd.DataFrame({1: [1.0, -1.0, 3.0], 2: [1.0, 1.0, 1.0], 3: [2.0, 2.0, 2.0]}, index=[1, 2, 3])
    shares = np.array([4.0, 2.0, 4.0]) / 10  # |x| summed over the last 2 steps (2 and 3)
    assert share_cv(by_k, 2) == pytest.approx(shares.std() / shares.mean())
    assert share_cv(by_k.iloc[:, :1], 2) != share_cv(by_k.iloc[:, :1], 2)  # one group: NaN


def test_share_cvs_from_the_per_mu_table_leave_out_daros_offset_and_divide_by_prompts():
    from daro_lab.ablation.summary import coefficient_of_variation, table_share_cvs

    pm = pd.DataFrame(
        {
            "step": [1, 1, 2, 2, 3, 3],
            "k": [1, 2] * 3,
            "contrib": [5.0, 5.0, -1.0, 3.0, 2.0, -1.0],
            "contrib_offset": [5.0, 5.0, 0.0, 0.0, 0.0, 0.0],
            "gradnorm": [np.nan, np.nan, 2.0, 2.0, np.nan, np.nan],
            "prompts": [1, 1, 1, 3, 3, 1],
        }
    )
    got = table_share_cvs(pm, window=2)  # steps 2 and 3
    c = np.array([1.0 + 2.0, 3.0 + 1.0])  # |C - offset| summed per k
    assert got["c_share_cv"] == pytest.approx(coefficient_of_variation(c / c.sum()))
    per_prompt = c / np.array([1 + 3, 3 + 1])
    assert got["c_share_cv_prompt"] == pytest.approx(coefficient_of_variation(per_prompt / per_prompt.sum()))
    assert got["g_share_cv"] == pytest.approx(0.0)  # equal G at step 2, the only measured step
    g_prompt = np.array([2.0 / 1, 2.0 / 3])
    assert got["g_share_cv_prompt"] == pytest.approx(coefficient_of_variation(g_prompt / g_prompt.sum()))
    # the offset matters: with it, step 1 (outside the window) aside, the shares would differ
    assert table_share_cvs(pm.assign(contrib_offset=0.0), window=3)["c_share_cv"] != pytest.approx(
        table_share_cvs(pm, window=3)["c_share_cv"]
    )


def test_null_verdict_states_the_minimal_detectable_difference():
    from daro_lab.ablation.summary import summarize, verdict

    per_seed = pd.DataFrame(
        {
            "arm": ["a"] * 4 + ["b"] * 4,
            "seed": [0, 1, 2, 3] * 2,
            "status": "FINISHED",
            "final_acc": [0.60, 0.62, 0.58, 0.61, 0.61, 0.60, 0.60, 0.62],
            "best_acc": 0.7,
            "steps_to_target": 10.0,
            "reached": 1.0,
            "balance_cv": 0.1,
            "balance_floor": 0.68,
            "balance_source": ["wS"] * 4 + ["C"] * 4,
        }
    )
    s = summarize(per_seed, ["a", "b"], reference="b").set_index("arm")
    line = verdict(s.loc["a"])
    assert "no difference larger than" in line and "4 paired seeds" in line, line
    assert math.isnan(s.loc["a", "balance_cv_p"])  # w signal / C against C_mu: never tested
    same = per_seed.assign(final_acc=[0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    s2 = summarize(same, ["a", "b"], reference="b").set_index("arm")
    assert verdict(s2.loc["a"]) == "identical to the reference in all 4 paired seeds (nothing to test)"


@pytest.mark.slow
def test_per_seed_warm_starts_are_prewarmed_in_parallel_equal_to_serial(tmp_path):
    """init_seed = 'per_seed' with 2 workers: the seeds' warm starts train in 2 processes at once, and each equals the
    warm start trained here, one after another (one thread each, whatever the process)."""
    import torch

    from daro_lab.ablation.sweep import _prewarm
    from daro_lab.config import config_from_dict
    from daro_lab.models.warmstart import INFO_FILE, cache_path, warm_start

    small = ["model.warmstart_steps=30", "model.hidden_size=32", "model.intermediate_size=64"]
    plans = {
        where: make_plan(
            "static-weights", "tiny", seeds=[3, 5], init_seed="per_seed", overrides=[*small, f"model.cache_dir={where}"]
        )
        for where in (tmp_path / "parallel", tmp_path / "serial")
    }
    said = []
    _prewarm(plans[tmp_path / "parallel"], said.append, workers=2)
    assert said == ["warm-starting the tiny model for the parallel arms: 2 warm start(s), 2 at a time"]
    c = config_from_dict(plans[tmp_path / "serial"].arms[0].config)
    in_parallel = dataclasses.replace(c.model, cache_dir=str(tmp_path / "parallel"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the serial warm starts run here, at another thread count than the workers'
    try:
        for seed in (3, 5):
            serial, _ = warm_start(c.model, c.task, seed)
            assert json.loads((cache_path(in_parallel, c.task, seed) / INFO_FILE).read_text())["threads"] == 1
            parallel, _ = warm_start(in_parallel, c.task, seed)  # from the cache the workers wrote
            for a, b in zip(serial.parameters(), parallel.parameters()):
                assert torch.equal(a, b)
        assert torch.get_num_threads() == 2  # the warm start gave the caller its thread count back
    finally:
        torch.set_num_threads(before)
    said.clear()
    _prewarm(plans[tmp_path / "parallel"], said.append, workers=2)  # cached: nothing to do
    assert said == []


def test_per_seed_init_seed_gives_each_seed_its_own_warm_start():
    from daro_lab.ablation.sweep import _task

    shared = make_plan("static-weights", "tiny")
    per_seed = make_plan("static-weights", "tiny", seeds=[3, 5], init_seed="per_seed")
    assert shared.init_seed == "shared" and per_seed.init_seed == "per_seed"
    arm = per_seed.arms[0]
    for seed in (3, 5):
        assert _task(per_seed, "sqlite:///x.db", "p", arm, seed, None, None, False).config["model"]["init_seed"] == seed
        base = shared.arms[0].config["model"]["init_seed"]
        assert (
            _task(shared, "sqlite:///x.db", "p", shared.arms[0], seed, None, None, False).config["model"]["init_seed"]
            == base
        )
    with pytest.raises(AblationError, match="--init-seed: expected 'shared' or 'per_seed'"):
        make_plan("static-weights", "tiny", init_seed="each")
