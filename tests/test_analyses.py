"""Analyses on synthetic MLflow runs whose per-mu values are known: every figure's saved table holds
exactly those values after aggregation, the reference curves are static_shape, the report's results
table matches the runs, incomplete runs still give a report that names what is missing, and the
CLI's errors exit with code 2.

One sqlite store per session holds every synthetic experiment; the report of the main experiment
draws every figure once, and the figure tests read the tables it saved.
"""

from __future__ import annotations

import json
import math
import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from analyses import AnalysisError, select_runs
from daro_lab.algorithms.losses import static_shape
from daro_lab.tracking import Tracker

K = 4
N_MB = 2  # trainer.mini_batch_prompts
T975_1 = float(stats.t.ppf(0.975, 1))  # the t quantile of a 95% interval over two seeds


def ci2(a, b):
    """Half-width of the 95% t-interval of two values."""
    return T975_1 * np.std([a, b], ddof=1) / math.sqrt(2)


def pm(step, mb, k, S, C, P, G=np.nan, w=np.nan, wL=np.nan, lc=3.0, li=5.0):
    """A per_mu row with the column names runs had before the record's vocabulary (L, C, S, w, wL, G): the
    analyses read them through record.normalise_per_mu, as they read old runs."""
    return {
        "step": step,
        "minibatch": mb,
        "k": k,
        "K": K,
        "mu": k / K,
        "L": C,
        "C": C,
        "S": S,
        "prompts": float(P),
        "tokens": 10.0,
        "len_correct": lc,
        "len_incorrect": li,
        "clipfrac_pos": 0.0,
        "clipfrac_neg": 0.0,
        "w": w,
        "wL": wL,
        "G": G,
        "G_L": G,
    }


# The per_mu tables of the main experiment. GRPO seed 0 has three mini-batches, (1,0), (1,1), (2,0):
#   (1,0): k1 S=1 C=-2 G=1 P=1 | k2 S=3 C=1 G=3 P=1              S shares 1/4, 3/4; |C| 2/3, 1/3; G 1/4, 3/4
#   (1,1): k1 S=2 C=1 P=2      | k3 S=2 C=-3 P=1  (no G)          S 1/2, 1/2; |C| 1/4, 3/4
#   (2,0): k2 S=1 C=1 G=2 P=1  | k3 S=1 C=1 G=2 P=1              S 1/2, 1/2; |C| 1/2, 1/2; G 1/2, 1/2
GRPO0 = [
    pm(1, 0, 1, 1, -2, 1, G=1, lc=2, li=4),
    pm(1, 0, 2, 3, 1, 1, G=3, lc=3, li=5),
    pm(1, 1, 1, 2, 1, 2, lc=4, li=6),
    pm(1, 1, 3, 2, -3, 1, lc=3, li=3),
    pm(2, 0, 2, 1, 1, 1, G=2, lc=5, li=7),
    pm(2, 0, 3, 1, 1, 1, G=2, lc=3, li=9),
]
# GRPO seed 1: one mini-batch, (1,0): k1 S=1 C=1 G=1 P=1 | k2 S=1 C=1 G=1 P=1 (k3 never appears)
GRPO1 = [pm(1, 0, 1, 1, 1, 1, G=1, lc=6, li=6), pm(1, 0, 2, 1, 1, 1, G=1, lc=3, li=5)]
DARO0 = [
    pm(1, 0, 1, 1, 1, 1, G=1, w=1.1, wL=0.5),
    pm(1, 0, 2, 1, -2, 1, G=1, w=0.9, wL=-2.0),
    pm(2, 0, 1, 1, 1, 1, G=4, w=1.2, wL=1.5),
]
DARO1 = [pm(1, 0, 1, 1, 1, 1, G=2, w=1.3, wL=0.25), pm(2, 0, 3, 1, 1, 1, G=2, w=1.0, wL=0.75)]
# held-out accuracy by step (overall and two levels), reward, total grad norm
ACC = {
    ("grpo", 0): {0: 0.5, 2: 0.6},
    ("grpo", 1): {0: 0.5, 2: 0.8},
    ("daro", 0): {0: 0.5, 2: 0.7},
    ("daro", 1): {0: 0.5, 2: 0.9},
    ("dapo", 0): {0: 0.5, 1: 0.65, 2: 0.55},
}
LEVEL = {1: 0.2, 2: -0.1}  # level_n accuracy = overall + LEVEL[n]
REWARD = {
    ("grpo", 0): {1: 0.1, 2: 0.2},
    ("grpo", 1): {1: 0.3, 2: 0.4},
    ("daro", 0): {1: 0.2, 2: 0.5},
    ("daro", 1): {1: 0.2, 2: 0.7},
    ("dapo", 0): {1: 0.5, 2: 0.6},
}
GNORM = {
    ("grpo", 0): {1: 2.0, 2: 4.0},
    ("grpo", 1): {1: 6.0, 2: 8.0},
    ("daro", 0): {1: 1.0, 2: 3.0},
    ("daro", 1): {1: 5.0, 2: 7.0},
    ("dapo", 0): {1: 1.0, 2: 1.0},
}
WEIGHTS = {("daro", 0): {1: (1.1, 0.9, 1.0), 2: (1.2, 0.8, 1.0)}, ("daro", 1): {1: (1.3, 1.0, 1.0), 2: (1.4, 1.0, 1.1)}}
# prompts by pass rate k = 0..K at steps 1 and 2 (table mu_hist), the same for every run
MU_HIST = [
    {"step": st, "k": k, "K": K, "mu": k / K, "prompts": n}
    for st, counts in ((1, (4, 1, 1, 1, 1)), (2, (2, 2, 2, 1, 1)))
    for k, n in enumerate(counts)
]
PER_MU = {
    ("grpo", 0): GRPO0,
    ("grpo", 1): GRPO1,
    ("daro", 0): DARO0,
    ("daro", 1): DARO1,
    ("dapo", 0): [pm(1, 0, 1, 1, 1, 2, G=1), pm(1, 0, 2, 1, 1, 1, G=1)],
}


def make_run(
    uri,
    art,
    experiment,
    method,
    seed,
    per_mu=None,
    acc=None,
    reward=None,
    gnorm=None,
    weights=None,
    hoeffding=None,
    mu_hist=None,
    **params,
):
    p = {
        "algo.method": method,
        "seed": seed,
        "rollout.num_responses": K,
        "trainer.mini_batch_prompts": N_MB,
        "trainer.grad_clip": 5.0,
        "algo.eps_low": 0.2,
        "algo.eps_high": 0.28,
        "algo.dual_clip": None,
        "trainer.steps": 2,
        "model.arch": "llama",
        "task.name": "arithmetic",
        **params,
    }
    tr = Tracker.start(
        uri,
        experiment,
        f"{method}-seed{seed}",
        p,
        json.dumps(p),
        tags={"daro_lab.method": method, "daro_lab.seed": seed},
        artifact_location=art,
        context_tags=False,
    )
    for step, v in (acc or {}).items():
        tr.log_metrics({"eval/greedy_acc": v, **{f"eval/greedy_acc/level_{n}": v + d for n, d in LEVEL.items()}}, step)
    for step, v in (reward or {}).items():
        tr.log_metrics({"reward/mean": v}, step)
    for step, v in (gnorm or {}).items():
        # the groups' gradient cosine on the even steps (as grad_norm_every measures it), only where G is logged
        tr.log_metrics({"grad/norm": v, **({"grad/cos_mean": v / 10} if step % 2 == 0 else {})}, step)
    for step, ws in (weights or {}).items():
        tr.log_metrics({f"daro/weight/mu_{k}of{K}": w for k, w in enumerate(ws, start=1)}, step)
    if per_mu:
        tr.log_table("per_mu", per_mu)
    if hoeffding is not None:
        tr.log_table("hoeffding", hoeffding)
    if mu_hist is not None:
        tr.log_table("mu_hist", mu_hist)
    tr.finish()
    return tr.run_id


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A sqlite store with experiments: 'full' (GRPO x2, DARO x2, DAPO x1 seeds), 'solo' (one GRPO
    run), 'noperm' (metrics but no per_mu table), 'empty' (no runs)."""
    root = tmp_path_factory.mktemp("analyses")
    uri, art = f"sqlite:///{root}/mlflow.db", str(root / "artifacts")
    ids = {}
    hoef = synthetic_hoeffding(np.random.default_rng(1), correlated=False, steps=1, per_group=12)
    for (method, seed), rows in PER_MU.items():
        key = (method, seed)
        ids[key] = make_run(
            uri,
            art,
            "full",
            method,
            seed,
            rows,
            ACC[key],
            REWARD[key],
            GNORM[key],
            WEIGHTS.get(key),
            hoeffding=hoef if key == ("grpo", 0) else None,
            mu_hist=MU_HIST,
        )
    ids["solo"] = make_run(uri, art, "solo", "grpo", 0, GRPO1, ACC[("grpo", 0)], REWARD[("grpo", 0)])
    ids["noperm"] = make_run(uri, art, "noperm", "grpo", 0, None, ACC[("grpo", 0)])
    from daro_lab.tracking import open_client

    open_client(uri).create_experiment("empty", artifact_location=art)
    return {"uri": uri, "root": root, "ids": ids}


@pytest.fixture(scope="session")
def full_report(store):
    from analyses.report import write_report

    return write_report(uri=store["uri"], experiment="full", out_dir=store["root"] / "report-full")


def saved(report, name):
    return pd.read_csv(report.out_dir / "figures" / f"{name}.csv")


# --------------------------------------------------------------------------------------------
# selecting runs


def test_select_runs_and_arms(store):
    runs = select_runs(store["uri"], experiment="full")
    assert len(runs) == 5
    assert list(runs.arms()) == ["GRPO", "DAPO", "DARO"]  # the paper's method order
    assert [r.seed for r in runs.arms()["GRPO"]] == [0, 1]
    assert runs.arm_style("GRPO")["color"] != runs.arm_style("DARO")["color"]
    by_ids = select_runs(store["uri"], run_ids=[store["ids"][("daro", 1)]])
    assert [r.method for r in by_ids] == ["daro"] and by_ids.experiment == "full"


def test_arms_of_one_method_get_shades_of_its_colour():
    from matplotlib.colors import to_rgb

    from analyses import style

    base = style.method_color("daro")
    assert style.shade(base, 0, 1) == base  # one arm: the method's colour
    shades = [style.shade(base, i, 8) for i in range(8)]
    assert len(set(shades)) == 8  # eight arms, eight colours
    lum = [sum(to_rgb(c)) for c in shades]
    assert lum == sorted(lum) and lum[0] < sum(to_rgb(base)) < lum[-1]  # dark to light, around the method's
    r, g, b = to_rgb(shades[0])
    R, G, B = to_rgb(base)
    assert r / R == pytest.approx(g / G, abs=0.01)  # darker by a common factor: the same hue


def test_row_labels_are_cut_to_the_lines_a_row_has_room_for():
    from analyses import style

    long = "mass, C = running mean signal (tiny preset default)"
    few = style.wrap_rows([long, "b"], 26, 1.5)  # two rows of 54 pt: room for several lines
    assert few[0].replace("\n", " ") == long and max(len(x) for x in few[0].split("\n")) <= 26
    many = style.wrap_rows([long] + list("bcdefgh"), 26, 1.5)  # eight rows of 13.5 pt: one line each
    assert "\n" not in many[0] and many[0].endswith("…") and len(many[0]) <= 26
    assert many[1] == "b"


def _legend_overlaps(grow: bool) -> tuple[float, list[bool]]:
    """(figure height, whether the arm legend overlaps each panel's labels and ticks) for 8 long arm labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analyses import style

    class Runs:  # what arm_legend reads of a RunSet
        def arm_style(self, arm):
            return {"color": "C0", "linestyle": "-", "marker": "o"}

    arms = [f"frozen at the final weights of 'learned' (same seed) [.../optimal-static-seed{i}.json]" for i in range(8)]
    with style.paper_style():
        fig, axes = style.new_figure(1, 3, height=2.6)
        for ax in axes[0]:
            ax.plot([0, 1], [0, 1])
            ax.set(title="(a) share", ylabel="share (sums to 1 over groups)", xlabel="pass rate")
        if grow:
            style.arm_legend(fig, Runs(), arms)
        else:  # the legend as drawn before arm_legend: the figure keeps its height
            fig.legend(handles=style.arm_handles(Runs(), arms), loc="outside upper center", ncol=2)
        FigureCanvasAgg(fig).draw()
        r = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(r)
        return fig.get_figheight(), [legend.overlaps(ax.get_tightbbox(r)) for ax in axes[0]]


def test_a_long_arm_legend_grows_the_figure_and_covers_no_panel():
    height, overlaps = _legend_overlaps(grow=True)
    assert height > 2.6 + 0.5 and not any(overlaps)
    assert any(_legend_overlaps(grow=False)[1])  # the check can fail: at a fixed height the legend covers panels


def test_one_colour_scale_reads_every_ks_groups():
    """Panels of runs with different K share one colour bar: its colour at (k-1)/(K-2) is mu_colors(K)[k] for every
    K, so 'dark = mu 1/K, light = (K-1)/K' reads each panel exactly; it sits below the panels, no panel legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analyses import style

    with style.paper_style():
        fig, axes = style.new_figure(1, 2)
        for ax, K in zip(axes[0], (4, 16)):
            for k, c in style.mu_colors(K).items():
                ax.plot([0, 1], [k, k], color=c)
        cb = style.mu_colorbar(fig, list(axes[0]), "curves")
        FigureCanvasAgg(fig).draw()
    for K in (4, 8, 16):
        for k, c in style.mu_colors(K).items():
            assert np.allclose(cb.cmap((k - 1) / max(K - 2, 1)), c, atol=0.01), (K, k)
    assert [t.get_text() for t in cb.ax.get_xticklabels()] == ["μ = 1/K (hardest)", "μ = (K−1)/K (easiest)"]
    assert cb.ax.get_position().y1 < min(ax.get_position().y0 for ax in axes[0])  # below the panels
    assert all(ax.get_legend() is None for ax in axes[0])


def test_many_arms_of_one_method_get_colours_of_their_own():
    from analyses import style
    from analyses.runs import Run, RunSet

    def run(i, method, arm):
        return Run(
            run_id=f"r{i}",
            name=f"r{i}",
            experiment="x",
            method=method,
            seed=0,
            status="FINISHED",
            params={},
            tags={"daro_lab.arm_label": arm},
            metric_keys=frozenset(),
            client=None,
        )

    few = RunSet("sqlite:///x.db", [run(0, "daro", "a"), run(1, "daro", "b"), run(2, "grpo", "g")], "test")
    assert few.arm_style("a")["color"] != few.arm_style("b")["color"]  # shades of DARO's colour
    assert few.arm_style("g")["color"] == style.method_color("grpo")
    many = RunSet("sqlite:///x.db", [run(i, "daro", f"a{i}") for i in range(8)] + [run(9, "grpo", "g")], "test")
    colours = [many.arm_style(f"a{i}")["color"] for i in range(8)]
    assert colours[0] == style.method_color("daro") and len(set(colours)) == 8
    assert style.method_color("grpo") not in colours  # never another method's colour


def test_select_runs_errors_name_what_is_missing(store):
    with pytest.raises(AnalysisError, match="experiment 'nope' not found.*full"):
        select_runs(store["uri"], experiment="nope")
    with pytest.raises(AnalysisError, match="'empty'.*has no runs"):
        select_runs(store["uri"], experiment="empty")
    with pytest.raises(AnalysisError, match="run 'deadbeef' not found"):
        select_runs(store["uri"], run_ids=["deadbeef"])
    with pytest.raises(AnalysisError, match="name an experiment"):
        select_runs(store["uri"])


def test_parent_run_expands_to_children(store):
    uri, art = store["uri"], str(store["root"] / "artifacts")
    parent = Tracker.start(uri, "ablation", "parent", {"x": 1}, "{}", artifact_location=art, context_tags=False)
    kids = []
    for seed in (0, 1):
        tr = Tracker.start(
            uri,
            "ablation",
            f"daro-{seed}",
            {"algo.method": "daro", "seed": seed, "algo.daro.lr_w": 0.01 * (seed + 1)},
            "{}",
            tags={"daro_lab.method": "daro", "daro_lab.seed": seed},
            parent_run_id=parent.run_id,
            artifact_location=art,
            context_tags=False,
        )
        tr.finish()
        kids.append(tr.run_id)
    parent.finish()
    runs = select_runs(uri, run_ids=[parent.run_id])
    assert sorted(r.run_id for r in runs) == sorted(kids)
    # two arms: the lr_w differs (an ablation), the seed does not make an arm
    assert sorted(runs.arms()) == ["DARO (lr_w=0.01)", "DARO (lr_w=0.02)"]
    exp = select_runs(uri, experiment="ablation")
    assert sorted(r.run_id for r in exp) == sorted(kids)  # the parent holds no training data
    assert (
        exp.slug() == "ablation" and select_runs(uri, run_ids=[parent.run_id]).slug() == f"ablation-{parent.run_id[:8]}"
    )
    # children of `daro-lab run ablation` carry their arm's label: it names the arm
    tr = Tracker.start(
        uri,
        "ablation",
        "static-grpo-seed0",
        {"algo.method": "static", "seed": 0},
        "{}",
        tags={
            "daro_lab.method": "static",
            "daro_lab.arm": "static-grpo",
            "daro_lab.arm_label": "w frozen at GRPO's shape",
        },
        parent_run_id=parent.run_id,
        artifact_location=art,
        context_tags=False,
    )
    tr.finish()
    assert "w frozen at GRPO's shape" in select_runs(uri, run_ids=[parent.run_id]).arms()


# --------------------------------------------------------------------------------------------
# loss-scale


def test_loss_scale_table_holds_the_known_shares(full_report):
    t = saved(full_report, "loss_scale").set_index(["arm", "k"])
    g = t.loc["GRPO"]
    # pooled over the window's mini-batches, then the mean over seeds (a group a seed never saw: 0)
    np.testing.assert_allclose(g.S_share.to_numpy(), [0.4, 0.45, 0.15], rtol=1e-12)
    np.testing.assert_allclose(g.C_abs_share.to_numpy(), [5 / 12, 13 / 36, 2 / 9], rtol=1e-12)
    np.testing.assert_allclose(g.G_share.to_numpy(), [5 / 16, 9 / 16, 1 / 8], rtol=1e-12)
    np.testing.assert_allclose(g.S_per_prompt.to_numpy(), [1.0, 1.5, 1.5], rtol=1e-12)
    # per prompt: shares within each mini-batch, mean per k, normalised per seed; then the mean over the seeds
    # that had the group, normalised: seed 0 [7, 15, 14] / 36, seed 1 [1/2, 1/2, -]
    np.testing.assert_allclose(g.S_share_per_prompt.to_numpy(), [25 / 86, 33 / 86, 28 / 86], rtol=1e-12)
    assert g.n_runs.tolist() == [2, 2, 1]
    for arm in ("GRPO", "DARO", "DAPO"):
        for col in ("S_share", "C_abs_share", "S_share_per_prompt"):
            assert t.loc[arm][col].sum() == pytest.approx(1.0)
    d = t.loc["DARO"]
    # w*L: mean over the window's rows where the group is present, then over seeds
    np.testing.assert_allclose(d["daro/wL"].to_numpy(), [(1.0 + 0.25) / 2, -2.0, 0.75], rtol=1e-12)
    np.testing.assert_allclose(d.wL_abs.to_numpy(), [(1.0 + 0.25) / 2, 2.0, 0.75], rtol=1e-12)
    assert d.ref_share.isna().all()  # DARO has no static shape


def test_loss_scale_reference_curves_are_static_shape(full_report):
    t = saved(full_report, "loss_scale").set_index(["arm", "k"])
    ref = saved(full_report, "loss_scale_reference")
    for method in ("grpo", "dapo"):
        r = ref[ref.method == method].sort_values("k")
        want = np.array([static_shape(method, k / K, N_MB) for k in r.k])
        np.testing.assert_allclose(r.static_shape.to_numpy(), want, rtol=1e-12)
        np.testing.assert_allclose(r.ref_share.to_numpy(), want / want.sum(), rtol=1e-12)
    # DAPO's one mini-batch holds k = 1, 2: the aggregated reference is the normalised shape over them
    want = np.array([static_shape("dapo", k / K, N_MB) for k in (1, 2)])
    np.testing.assert_allclose(t.loc["DAPO"].ref_share.to_numpy(), want / want.sum(), rtol=1e-12)
    # GRPO's shape is 2 sqrt(mu(1-mu)) / N (docs/math.md), written out
    r = ref[ref.method == "grpo"].sort_values("k")
    np.testing.assert_allclose(r.static_shape, [2 * math.sqrt(m * (1 - m)) / N_MB for m in r.mu], rtol=1e-12)


def test_loss_scale_of_runs_with_different_k_has_their_equal_shares_and_one_colour_scale(store, tmp_path):
    """A K = 4 run (3 groups) beside a K = 8 run (7 groups): panels (b), (c) draw equal shares for each group count,
    each labelled, and the by-step panels share one colour scale instead of a legend each."""
    from analyses.loss_scale import plot_loss_scale

    k8 = [
        {**pm(step, 0, k, 1.0 + k, 1.0 if k % 2 else -1.0, 1, G=1.0 + k), "K": 8, "mu": k / 8}
        for step in (1, 2)
        for k in range(1, 8)
    ]
    make_run(store["uri"], str(store["root"] / "artifacts"), "mixed-k", "grpo", 0, GRPO0, ACC[("grpo", 0)])
    make_run(
        store["uri"],
        str(store["root"] / "artifacts"),
        "mixed-k",
        "dapo",
        0,
        k8,
        ACC[("grpo", 0)],
        **{"rollout.num_responses": 8},
    )
    res = plot_loss_scale(select_runs(store["uri"], experiment="mixed-k"), tmp_path)
    fig = res.figure
    for title in ("(b)", "(c)"):
        (ax,) = [a for a in fig.axes if a.get_title().startswith(title)]
        assert ax.get_legend() is None  # the lines carry their labels
        assert sorted(line.get_ydata()[0] for line in ax.get_lines()[-2:]) == pytest.approx([1 / 7, 1 / 3])
        assert sorted(t.get_text() for t in ax.texts) == ["1/3", "1/7"]
    step_axes = [a for a in fig.axes if "share of |C| by step" in a.get_title()]
    assert len(step_axes) == 2 and all(a.get_legend() is None for a in step_axes)
    assert any("pass-rate group, in each panel's own K" in a.get_xlabel() for a in fig.axes)
    from analyses.grad_norms import plot_grad_norms  # the same colour scale for the G_mu panels

    fig = plot_grad_norms(select_runs(store["uri"], experiment="mixed-k"), tmp_path).figure
    g_axes = [a for a in fig.axes if "G$_\\mu$ = " in a.get_title()]
    assert len(g_axes) == 2 and all(a.get_legend() is None for a in g_axes)
    assert any(a.get_xlabel().startswith("G_μ panels: pass-rate group") for a in fig.axes)


def test_loss_scale_steps_and_window(store):
    from analyses.loss_scale import loss_scale_tables

    runs = select_runs(store["uri"], experiment="full")
    table, steps, _, _ = loss_scale_tables(runs)
    s = steps[steps.arm == "GRPO"].set_index(["step", "k"]).C_abs_share
    # step 1: seed 0 pools (1,0) and (1,1): |C| 3, 1, 3 of 7; seed 1 has one mini-batch; then the mean over seeds
    assert s[(1, 1)] == pytest.approx((3 / 7 + 1 / 2) / 2)
    assert s[(1, 3)] == pytest.approx((3 / 7 + 0) / 2)
    assert s[(2, 2)] == pytest.approx(1 / 2)  # only seed 0 logged step 2
    win, _, _, _ = loss_scale_tables(runs, window=(2, 2))
    g = win[win.arm == "GRPO"].set_index("k")
    assert g.S_share.to_dict() == pytest.approx({2: 0.5, 3: 0.5})


class _TableRun:
    """A stand-in for analyses.runs.Run holding one per_mu table."""

    def __init__(self, method, rows):
        self.method, self.run_id, self.params = method, method, {}
        self._t = pd.DataFrame(rows)

    def table(self, name):
        return self._t

    def param(self, key, default=None, cast=str):
        return default


@pytest.mark.parametrize("method", ["grpo", "dapo", "dr_grpo", "lipo"])
def test_loss_scale_shapes_from_the_real_loss_with_unequal_lengths(method):
    """Per-mu metrics of the real loss on a batch whose wrong answers are longer, and whose lengths change with
    mu: GRPO stays on its static shape (its per-response token-mean cancels lengths: a consistency check); the
    token-summing methods depart from the equal-length shape (the measurement) and sit on the length-corrected
    shape (the consistency check of the accounting); C is the coefficient part, pooled."""
    import torch

    from analyses.loss_scale import run_summary
    from daro_lab.algorithms import METHODS, LossSettings, PolicyBatch, compute_advantages, policy_loss
    from daro_lab.record import per_mu_rows

    Kk, rows = 8, []
    g = torch.Generator().manual_seed(0)
    for mb in range(3):
        ks = torch.arange(1, Kk).repeat(2)  # every interior k twice
        rewards = (torch.arange(Kk)[None, :] < ks[:, None]).double()
        right = (4 + 2 * (Kk - ks))[:, None].expand(-1, Kk)  # right answers shorter, and longer at low mu
        lengths = torch.where(rewards > 0.5, right, 3 * right).flatten()
        T = int(lengths.max())
        mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
        old = -torch.rand(len(lengths), T, generator=g, dtype=torch.float64)
        logp = old + (0.3 * torch.randn(len(lengths), T, generator=g, dtype=torch.float64) if mb else 0.0)
        adv = compute_advantages(rewards, METHODS[method].advantage)
        b = PolicyBatch(
            logp=logp,
            old_logp=old,
            mask=mask,
            advantages=adv.flatten(),
            num_correct=ks.repeat_interleave(Kk),
            rewards=rewards.flatten(),
            prompt_index=torch.arange(len(ks)).repeat_interleave(Kk),
        )
        _, m = policy_loss(method, b, Kk, LossSettings(max_response_length=T))
        rows += per_mu_rows(m, Kk, step=1, minibatch=mb)
    s = run_summary(_TableRun(method, rows)).set_index("k")
    if method == "grpo":
        np.testing.assert_allclose(s.S_share_per_prompt, s.ref_share, rtol=1e-5)
    else:
        np.testing.assert_allclose(s.S_share_per_prompt, s.lc_share, rtol=1e-5)
        assert (s.S_share_per_prompt - s.ref_share).abs().max() > 0.02
    assert s.C_abs_share.sum() == pytest.approx(1.0) and (s.C_abs_share > 0).all()


def test_grpo_on_policy_loss_is_rounding_and_gets_no_share():
    """At rho = 1, GRPO's advantages sum to 0 in every group: C = 0 up to float rounding, so the figure draws no
    |C| share for it instead of shares of rounding noise."""
    import torch

    from analyses.loss_scale import run_summary
    from daro_lab.algorithms import PolicyBatch, compute_advantages, policy_loss
    from daro_lab.record import per_mu_rows

    Kk = 4
    ks = torch.tensor([1, 2, 3, 2])
    rewards = (torch.arange(Kk)[None, :] < ks[:, None]).double()
    lengths = torch.tensor([3, 5, 7, 2] * 4)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).double()
    logp = -torch.rand(16, 7, dtype=torch.float64)
    b = PolicyBatch(
        logp=logp,
        old_logp=logp.clone(),
        mask=mask,
        advantages=compute_advantages(rewards, "group_std").flatten(),
        num_correct=ks.repeat_interleave(Kk),
        rewards=rewards.flatten(),
        prompt_index=torch.arange(4).repeat_interleave(Kk),
    )
    _, m = policy_loss("grpo", b, Kk)
    s = run_summary(_TableRun("grpo", per_mu_rows(m, Kk, step=1, minibatch=0)))
    assert s.C_abs_share.isna().all()
    assert s.S_share.notna().all()


# --------------------------------------------------------------------------------------------
# the other figures


def test_length_vs_mu_weighted_means(store, full_report):
    from analyses.length_vs_mu import length_table

    # the report's figure: two phases (steps 1 and 2); here one phase over both steps
    phases = saved(full_report, "length_vs_mu")
    assert sorted(set(zip(phases.step_first, phases.step_last))) == [(1, 1), (2, 2)]
    assert phases.set_index(["arm", "phase", "k"]).loc[("GRPO", 2, 3)].len_incorrect == pytest.approx(9.0)
    t, _ = length_table(select_runs(store["uri"], experiment="full"), n_phases=1)
    t = t.set_index(["arm", "k"])
    # GRPO k=1: rows (P=1, lc 2, li 4), (P=2, lc 4, li 6) of seed 0 and (P=1, lc 6, li 6) of seed 1;
    # correct responses P*k, incorrect P*(K-k)
    assert t.loc[("GRPO", 1)].len_correct == pytest.approx((1 * 2 + 2 * 4 + 1 * 6) / (1 + 2 + 1))
    assert t.loc[("GRPO", 1)].len_incorrect == pytest.approx((3 * 4 + 6 * 6 + 3 * 6) / (3 + 6 + 3))
    assert t.loc[("GRPO", 3)].len_incorrect == pytest.approx((1 * 3 + 1 * 9) / 2)
    assert t.loc[("GRPO", 1)].n_runs == 2
    paths = full_report.figures["length-vs-mu"].paths
    assert {p.suffix for p in paths.values()} == {".png", ".svg", ".pdf", ".csv"}


def test_phases_split_steps():
    from analyses.length_vs_mu import phases_of

    assert phases_of([1, 2, 3, 4, 5, 6, 7], 3) == [(1, 3), (4, 5), (6, 7)]
    assert phases_of([5, 5, 6], 3) == [(5, 5), (6, 6)]


def test_weights_table(full_report):
    t = saved(full_report, "weights").set_index(["step", "k"])
    assert t.loc[(1, 1)].w == pytest.approx((1.1 + 1.3) / 2)
    assert t.loc[(2, 3)].w == pytest.approx((1.0 + 1.1) / 2)
    assert t.loc[(2, 1)].w_ci == pytest.approx(ci2(1.2, 1.4))
    assert t.loc[(1, 1)].wL == pytest.approx((0.5 + 0.25) / 2)
    assert t.loc[(2, 1)].wL == pytest.approx(1.5)  # only seed 0 had k=1 at step 2
    assert set(t.arm) == {"DARO"}


def test_convergence_curves_and_steps_to_target(full_report, store):
    c = saved(full_report, "convergence").set_index(["arm", "metric", "step"])
    assert c.loc[("GRPO", "eval/greedy_acc", 2)]["mean"] == pytest.approx(0.7)
    assert c.loc[("GRPO", "eval/greedy_acc", 2)].ci == pytest.approx(ci2(0.6, 0.8))
    assert c.loc[("DARO", "reward/mean", 2)]["mean"] == pytest.approx(0.6)
    assert np.isnan(c.loc[("DAPO", "eval/greedy_acc", 1)].ci)  # one seed: no interval
    from analyses.convergence import curves, steps_to_target

    runs = select_runs(store["uri"], experiment="full")
    acc = curves(runs, ["eval/greedy_acc"])
    s = steps_to_target(runs, acc, 0.62).set_index("arm")
    assert s.loc["DAPO"].step_mean_curve == 1 and s.loc["GRPO"].step_mean_curve == 2
    assert s.loc["GRPO"].steps_per_run == "-;2" and s.loc["GRPO"].n_reached == 1
    never = steps_to_target(runs, acc, 0.95).set_index("arm")
    assert never.step_mean_curve.isna().all()


def test_convergence_on_one_levels_endpoint(store, tmp_path):
    """accuracy='MODE:level_N' (an ablation's one-level endpoint): that level's curve in panel (b) and its steps to
    target, the same steps as the all-levels curve at a target shifted by the level's fixed offset (LEVEL)."""
    from analyses.convergence import plot_convergence

    runs = select_runs(store["uri"], experiment="full")
    res = plot_convergence(runs, tmp_path, accuracy="greedy:level_1", target=0.62 + LEVEL[1])
    c = res.tables["convergence"]
    assert "eval/greedy_acc/level_1" in set(c.metric)
    s = res.tables["convergence_steps"].set_index("arm")
    assert s.loc["DAPO"].step_mean_curve == 1 and s.loc["GRPO"].step_mean_curve == 2
    assert s.loc["GRPO"].steps_per_run == "-;2"
    assert "greedy accuracy on the level-1 prompts only (b" in res.caption and "greedy level-1 accuracy" in res.caption
    with pytest.raises(AnalysisError, match="accuracy: expected 'greedy', 'sampled'"):
        plot_convergence(runs, tmp_path, accuracy="greedy:lvl_1")


def test_grad_norms_table(full_report):
    t = saved(full_report, "grad_norms")
    tot = t[t.quantity == "total"].set_index(["arm", "step"])
    assert tot.loc[("GRPO", 1)]["mean"] == pytest.approx(4.0)
    assert tot.loc[("GRPO", 1)].ci == pytest.approx(ci2(2.0, 6.0))
    g = t[t.quantity == "G"].set_index(["arm", "step", "k"])
    assert g.loc[("DARO", 1, 1)]["mean"] == pytest.approx(1.5)  # seeds: 1 and 2
    assert g.loc[("DARO", 2, 1)]["mean"] == pytest.approx(4.0)
    assert g.loc[("GRPO", 2, 3)].n_runs == 1


def test_levels_table(full_report):
    t = saved(full_report, "levels").set_index(["arm", "level", "step"])
    assert set(t.metric) == {"greedy_acc"}  # the synthetic runs logged no sampled accuracy
    assert t.loc[("GRPO", 1, 2)]["mean"] == pytest.approx(np.mean([0.6 + 0.2, 0.8 + 0.2]))
    assert t.loc[("GRPO", 1, 2)].ci == pytest.approx(ci2(0.8, 1.0))
    assert t.loc[("DAPO", 2, 1)]["mean"] == pytest.approx(0.65 - 0.1) and t.loc[("DAPO", 2, 1)].n_runs == 1


def test_mu_hist_table(full_report):
    t = saved(full_report, "mu_hist").set_index(["arm", "step", "k"])
    assert t.loc[("GRPO", 1, 0)].prompts == 8  # two runs, 4 each
    assert t.loc[("GRPO", 1, 0)].share == pytest.approx(4 / 8)
    assert t.loc[("DARO", 2, 3)].share == pytest.approx(1 / 8)


def test_grad_share_per_group_per_prompt_and_clipping(full_report):
    t = saved(full_report, "grad_share").set_index(["arm", "k"])
    # GRPO: measured (run, step, mini-batch) shares of G: k1 1/4 and 1/2; k2 3/4, 1/2, 1/2; k3 1/2
    assert t.loc[("GRPO", 1)].g_share == pytest.approx(np.mean([0.25, 0.5]))
    assert t.loc[("GRPO", 2)].g_share == pytest.approx(np.mean([0.75, 0.5, 0.5]))
    assert t.loc[("GRPO", 3)].g_share == pytest.approx(0.5) and t.loc[("GRPO", 3)].n_steps == 1
    # DAPO: equal G, but k1 holds two prompts: per group 1/2 and 1/2, per prompt 1/3 and 2/3
    assert t.loc[("DAPO", 1)].g_share == pytest.approx(0.5)
    assert (t.loc[("DAPO", 1)].g_share_per_prompt, t.loc[("DAPO", 2)].g_share_per_prompt) == (
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
    )
    c = saved(full_report, "clipping").set_index("arm")
    assert c.loc["GRPO"].clipped_fraction == pytest.approx(2 / 4)  # norms 2, 4, 6, 8 against the clip 5
    assert c.loc["DAPO"].clipped_fraction == 0 and c.loc["GRPO"].median_norm == pytest.approx(5.0)
    # the groups' gradient cosine (grad/cos_mean, logged on step 2 of each run as norm / 10): GRPO 0.4 and 0.8
    assert (c.loc["GRPO"].cos_mean, c.loc["GRPO"].cos_steps) == (pytest.approx(0.6), 2)
    assert (c.loc["GRPO"].cos_p10, c.loc["GRPO"].cos_p90) == (pytest.approx(0.44), pytest.approx(0.76))


def test_grad_share_caption_says_where_the_cosine_was_not_measured():
    from analyses.grad_share import _caption

    share = pd.DataFrame(columns=["arm", "g_share", "g_share_per_prompt"])
    clips = pd.DataFrame(
        [
            {
                "arm": "a",
                "clipped_fraction": 0.5,
                "median_norm": 2.0,
                "steps": 4,
                "clip": 1.0,
                "cos_mean": 0.1,
                "cos_p10": 0.0,
                "cos_p90": 0.2,
                "cos_steps": 2,
            },
            {
                "arm": "b",
                "clipped_fraction": 0.5,
                "median_norm": 2.0,
                "steps": 4,
                "clip": 1.0,
                "cos_mean": np.nan,
                "cos_p10": np.nan,
                "cos_p90": np.nan,
                "cos_steps": 0,
            },
        ]
    )
    text = _caption(share, clips)
    assert "a 0.10 (10th-90th percentile 0.00 to 0.20, 2 steps)" in text
    assert "not measured for b (it is logged on the steps that measure G_μ" in text
    assert "not measured" not in _caption(share, clips.iloc[:1])


# --------------------------------------------------------------------------------------------
# the Hoeffding check, both ways


def synthetic_hoeffding(rng, correlated: bool, steps: int = 3, per_group: int = 40, b_neg: float = 1.6):
    """Rows like the trainer's hoeffding table. Tokens of a response are independent draws in the
    clipped factor's range, or (correlated) one draw repeated over the whole response."""
    rows = []
    for step in range(1, steps + 1):
        for k in (1, 2, 3):
            for sign in (1, -1):
                a, b = (0.0, 1.28) if sign > 0 else (0.8, b_neg)
                for p in range(per_group):
                    n = int(rng.integers(8, 65))
                    g = np.full(n, rng.uniform(a, b)) if correlated else rng.uniform(a, b, n)
                    rows.append(
                        {
                            "step": step,
                            "minibatch": 1,
                            "K": K,
                            "k": k,
                            "prompt": p,
                            "adv": 0.7 * sign,
                            "sign": sign,
                            "length": float(n),
                            "g_mean": float(g.mean()),
                            "rho_max": b if sign < 0 else 1.1,
                        }
                    )
    df = pd.DataFrame(rows)
    df["g_group_mean"] = df.groupby(["step", "minibatch", "k", "sign"]).g_mean.transform("mean")
    return df


def test_hoeffding_holds_for_independent_tokens():
    from analyses.hoeffding import hoeffding_check

    c = hoeffding_check(synthetic_hoeffding(np.random.default_rng(0), correlated=False))
    cov = c.coverage[c.coverage.scope == "all"].set_index("delta")
    for delta in (0.01, 0.05, 0.1):
        assert cov.loc[delta].coverage >= 1 - delta
        assert c.verdicts[delta] == "holds"
    assert c.holds and not c.fails
    assert int(c.tail.significant.sum()) == 0
    assert "HOLDS" in c.text and "not independent" in c.text and not c.tail_exceeds
    # without a dual clip the negative-advantage range ends at a high quantile of the ratios, and says so
    neg = c.ranges[c.ranges.sign == "-"]
    assert neg.b.tolist() == [1.6] and "99% quantile" in neg.b_source.iloc[0]


def test_hoeffding_range_is_not_set_by_one_outlier():
    from analyses.hoeffding import hoeffding_check

    df = synthetic_hoeffding(np.random.default_rng(0), correlated=False)
    df.loc[df.index[df.sign < 0][0], "rho_max"] = 50.0  # one response with a huge ratio
    c = hoeffding_check(df)
    neg = c.ranges[c.ranges.sign == "-"].iloc[0]
    assert neg.b == pytest.approx(1.6) and neg.share_above_b == pytest.approx(1 / (df.sign < 0).sum())
    assert "have a ratio above b" in c.text
    # a response whose g runs far past b deviates beyond anything the bound allows: the coverage may still hold,
    # the tail does not, and the verdict says so
    far = df.index[df.sign < 0][0]
    df.loc[far, "g_mean"] = df.loc[far, "g_group_mean"] + 3.0
    df["g_group_mean"] = df.groupby(["step", "minibatch", "k", "sign"]).g_mean.transform("mean")
    c = hoeffding_check(df)
    assert c.tail_exceeds and "the tail does not" in c.text


def test_hoeffding_is_vacuous_where_no_observation_could_contradict_the_bound():
    from analyses.hoeffding import hoeffding_check

    df = synthetic_hoeffding(np.random.default_rng(0), correlated=False)
    # deviations of 1e-4 of the range: the bound is >= 1 at every one of them
    df["g_mean"] = df.g_group_mean + 1e-4 * np.sign(np.random.default_rng(1).normal(size=len(df)))
    c = hoeffding_check(df)
    assert c.vacuous and set(c.verdicts.values()) == {"vacuous"} and not c.holds
    assert "VACUOUS" in c.text and "not evidence" in c.text
    # responses shorter than min_tokens are not tested; all short: vacuous, said so
    short = synthetic_hoeffding(np.random.default_rng(0), correlated=True).assign(length=4.0)
    c = hoeffding_check(short)
    assert c.vacuous and c.excluded_short == len(short) and "VACUOUS" in c.text
    # why: tested anyway, fully correlated 4-token responses do not fail (the band is 0.68 of the range at
    # delta = 0.05, wider than any deviation from the mean of a uniform draw)
    assert not hoeffding_check(short, min_tokens=2).fails


def test_hoeffding_detects_correlated_tokens():
    from analyses.hoeffding import hoeffding_check

    c = hoeffding_check(synthetic_hoeffding(np.random.default_rng(0), correlated=True))
    assert c.fails and not c.holds
    assert all(v == "fails" for v in c.verdicts.values())
    cov = c.coverage[(c.coverage.scope == "all") & (c.coverage.delta == 0.05)].iloc[0]
    assert cov.cp_high < 0.95
    assert int(c.tail.significant.sum()) > 0
    assert "FAILS" in c.text


def test_hoeffding_few_responses_give_no_firm_verdict():
    from analyses.hoeffding import hoeffding_check

    c = hoeffding_check(synthetic_hoeffding(np.random.default_rng(3), correlated=False, steps=1, per_group=5))
    assert len(c.responses) == 30
    # no deviation of these 30 reaches the region where the bound is below 1: nothing could contradict it
    assert set(c.verdicts.values()) == {"vacuous"}
    assert not c.holds and not c.fails and "VACUOUS" in c.text
    # with a few larger deviations the bound is tested, met, and 30 responses cannot establish 1 - delta
    df = synthetic_hoeffding(np.random.default_rng(3), correlated=False, steps=1, per_group=5)
    df.loc[df.index[:2], "g_mean"] = df.g_group_mean.iloc[:2] + 0.3 * 1.28  # A > 0 rows: range [0, 1.28]
    c = hoeffding_check(df)
    assert set(c.verdicts.values()) <= {"consistent", "inconclusive"} and "NO FIRM VERDICT" in c.text


def test_hoeffding_dual_clip_sets_the_range_and_singletons_are_left_out():
    from analyses.hoeffding import hoeffding_check

    df = synthetic_hoeffding(np.random.default_rng(2), correlated=False, steps=1, per_group=5)
    lone = df.iloc[[0]].assign(k=2, step=9, g_group_mean=df.g_mean.iloc[0])  # alone in its group
    c = hoeffding_check(pd.concat([df, lone], ignore_index=True), dual_clip=3.0)
    assert c.ranges[c.ranges.sign == "-"].b.tolist() == [3.0]
    assert c.excluded_singletons == 1 and len(c.responses) == len(df)


def test_hoeffding_factorised_loss_error():
    from analyses.hoeffding import hoeffding_check

    # one group (k=1): two A>0 responses (n 2 and 4, mean g 1.0 and 1.3) and two A<0 ones (g 0.9, 0.9)
    df = pd.DataFrame(
        {
            "step": 1,
            "minibatch": 1,
            "K": 4,
            "k": 1,
            "prompt": [0, 0, 1, 1],
            "adv": [1.0, 1.0, -1.0, -1.0],
            "sign": [1, 1, -1, -1],
            "length": [2.0, 4.0, 2.0, 2.0],
            "g_mean": [1.0, 1.3, 0.9, 0.9],
            "rho_max": [1.0, 1.3, 0.95, 0.95],
        }
    )
    df["g_group_mean"] = df.groupby("sign").g_mean.transform("mean")
    f = hoeffding_check(df).factorisation.iloc[0]
    exact = -(2 * 1.0 + 4 * 1.3 - 2 * 0.9 - 2 * 0.9) / 10
    fact = -(2 * 1.15 + 4 * 1.15 - 2 * 0.9 - 2 * 0.9) / 10
    assert f.exact == pytest.approx(exact) and f.factorised == pytest.approx(fact)
    assert f.rel_err == pytest.approx(abs(exact - fact) / abs(exact))
    assert f.err_vs_mass == pytest.approx(abs(exact - fact) / ((2 * 1.0 + 4 * 1.3 + 2 * 0.9 + 2 * 0.9) / 10))


def test_hoeffding_figure_from_runs(full_report):
    res = full_report.figures["hoeffding"]
    cov = saved(full_report, "hoeffding_coverage")
    assert set(cov.scope) >= {"all", "length", "sign", "method"}
    assert res.summary["verdicts"].keys() == {0.01, 0.05, 0.1}
    assert res.paths["png"].stat().st_size > 0


# --------------------------------------------------------------------------------------------
# the report


def test_report_results_table_matches_the_runs(full_report):
    r = full_report.results.set_index(["arm", "level"])
    g = r.loc[("GRPO", "all")]
    assert (g.n_seeds, g.start_mean, g.final_mean, g.best_mean) == (2, 0.5, pytest.approx(0.7), pytest.approx(0.7))
    assert g.final_ci == pytest.approx(ci2(0.6, 0.8))
    d = r.loc[("DAPO", "all")]  # best over steps >= 1 (0.65 at step 1), final at step 2
    assert (d.final_mean, d.best_mean) == (pytest.approx(0.55), pytest.approx(0.65)) and np.isnan(d.final_ci)
    lvl = r.loc[("DARO", "2")]
    assert lvl.final_mean == pytest.approx(0.8 - 0.1) and lvl.final_ci == pytest.approx(ci2(0.6, 0.8))
    on_disk = pd.read_csv(full_report.out_dir / "results.csv")
    assert len(on_disk) == len(full_report.results) == 3 * 3  # 3 arms x (all + 2 levels)


def test_report_html_is_self_contained_and_has_every_figure(full_report):
    from analyses import FIGURES

    html = full_report.html.read_text(encoding="utf-8")
    assert not full_report.errors
    for name in FIGURES:
        assert f"id='fig-{name}'" in html
    assert html.count("data:image/png;base64,") == len(FIGURES)
    import base64
    import io
    import re

    from PIL import Image

    from analyses.report import EMBED_WIDTH_PX

    first = re.search(r"id='fig-([\w-]+)'><img src='data:image/png;base64,([^']+)'", html)
    page = base64.b64decode(first.group(2))
    full = (full_report.out_dir / "figures" / f"{first.group(1)}.png").read_bytes()
    with Image.open(io.BytesIO(page)) as a, Image.open(io.BytesIO(full)) as b:  # the page's copy: screen-sized
        assert a.width == min(b.width, EMBED_WIDTH_PX) and abs(a.height / a.width - b.height / b.width) < 0.01
    assert len(page) < len(full)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "0.700 ± " in html  # GRPO's final accuracy, mean ± CI
    assert "Hoeffding verdict" in html
    assert full_report.pdf.read_bytes()[:5] == b"%PDF-"
    assert any("Methods of the paper with no run here: Dr. GRPO, LIPO" in m for m in full_report.missing)


def test_report_renders_for_incomplete_runs_and_says_what_is_missing(store, tmp_path):
    from analyses.report import write_report

    rep = write_report(uri=store["uri"], experiment="solo", out_dir=tmp_path, figures=["convergence", "weights"])
    text = " ".join(rep.missing)
    assert "Only one method (GRPO)" in text
    assert "No DARO run" in text
    assert "One seed only for GRPO" in text
    assert "weights" in rep.errors and "DARO weights" in rep.errors["weights"]
    html = rep.html.read_text(encoding="utf-8")
    assert "What these runs lack" in html and "No DARO run" in html
    assert "NO VERDICT" in html  # the Hoeffding check was not possible, and the report says so
    assert rep.pdf.stat().st_size > 0
    assert rep.results.set_index("level").loc["all"].final_mean == pytest.approx(0.6)


def test_report_refuses_runs_without_per_mu_data(store, tmp_path):
    from analyses.report import write_report

    with pytest.raises(AnalysisError, match="per_mu"):
        write_report(uri=store["uri"], experiment="noperm", out_dir=tmp_path)


def test_figures_name_the_missing_table(store):
    from analyses.loss_scale import plot_loss_scale
    from analyses.weights import plot_weights

    with pytest.raises(AnalysisError, match="none of the selected runs.*'per_mu'"):
        plot_loss_scale(uri=store["uri"], experiment="noperm")
    with pytest.raises(AnalysisError, match="DARO weights"):
        plot_weights(uri=store["uri"], experiment="solo")


# --------------------------------------------------------------------------------------------
# the CLI

runner = CliRunner()


def _cli(*args):
    from daro_lab.cli import app

    return runner.invoke(app, list(args))


def test_cli_errors_exit_2_naming_what_is_missing(store, tmp_path):
    uri = store["uri"]
    r = _cli("plot", "no-such-figure", "--tracking-uri", uri)
    assert r.exit_code == 2 and "unknown figure 'no-such-figure'" in r.output and "loss-scale" in r.output
    r = _cli("plot", "loss-scale", "--experiment", "nope", "--tracking-uri", uri)
    assert r.exit_code == 2 and "experiment 'nope' not found" in r.output
    r = _cli("report", "--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path))
    assert r.exit_code == 2 and "experiment 'nope' not found" in r.output
    r = _cli("plot", "loss-scale", "--experiment", "noperm", "--tracking-uri", uri, "--out", str(tmp_path))
    assert r.exit_code == 2 and "per_mu" in r.output
    r = _cli("report", "--experiment", "noperm", "--tracking-uri", uri, "--out", str(tmp_path))
    assert r.exit_code == 2 and "per-mu data" in r.output
    r = _cli("plot", "weights", "--runs", "deadbeef", "--tracking-uri", uri)
    assert r.exit_code == 2 and "run 'deadbeef' not found" in r.output


def test_cli_plot_writes_the_figure_and_its_table(store, tmp_path):
    ids = store["ids"]
    r = _cli(
        "plot",
        "weights",
        "--runs",
        f"{ids[('daro', 0)]},{ids[('daro', 1)]}",
        "--tracking-uri",
        store["uri"],
        "--out",
        str(tmp_path),
    )
    assert r.exit_code == 0, r.output
    for ext in ("png", "svg", "pdf", "csv"):
        assert (tmp_path / f"weights.{ext}").stat().st_size > 0
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "weights.svg").read_bytes()[:2000]


def test_daro_shares_leave_the_offset_out():
    """C_mu on DARO's path includes -C ln w_mu, which carries no theta-gradient: the |C| share uses C - C_offset."""
    from analyses.loss_scale import run_summary

    rows = [
        {
            "step": 1,
            "minibatch": 0,
            "k": k,
            "K": 4,
            "mu": k / 4,
            "scale": 1.0,
            "prompts": 1.0,
            "loss": 0.1 * k,
            "contrib": 0.1 * k * w - np.log(w),
            "contrib_offset": -np.log(w),
            "daro/weight_used": w,
            "daro/wS": 1.0,
            "len_correct": 2.0,
            "len_incorrect": 3.0,
        }
        for k, w in ((1, 1.5), (2, 0.5), (3, 1.0))
    ]
    s = run_summary(_TableRun("daro", rows)).set_index("k")
    coef = np.array([0.1 * 1.5, 0.2 * 0.5, 0.3])
    np.testing.assert_allclose(s.C_abs_share, coef / coef.sum(), rtol=1e-12)


def test_report_carries_no_local_paths_and_keeps_frozen_weights_beside_it(store, tmp_path):
    """Machine-local paths (store, checkpoints, cache, frozen-weight files) appear as '…/<last part>'; the frozen
    weights a static arm needs to rerun are written to inputs/ beside the report, from the run's tag."""
    from analyses.report import write_report

    uri, art = store["uri"], str(store["root"] / "artifacts")
    weights = {"1": 1.5, "2": 0.75, "3": 1.0}
    ids = []
    for method, extra in (
        ("daro", {}),
        ("static", {"algo.daro.static": "/tmp/sweep-x/ckpt/optimal-static-seed0-weights.json"}),
    ):
        p = {
            "algo.method": method,
            "seed": 0,
            "rollout.num_responses": K,
            "trainer.mini_batch_prompts": N_MB,
            "tracking.uri": "sqlite:////tmp/sweep-x/mlflow.db",
            "trainer.checkpoint_dir": "/tmp/sweep-x/ckpt",
            "model.cache_dir": "/tmp/sweep-x/.daro_cache",
            **extra,
        }
        tags = {"daro_lab.method": method, "daro_lab.seed": 0}
        if method == "static":
            tags["daro_lab.static_weights"] = json.dumps(weights)
        tr = Tracker.start(
            uri, "paths", f"{method}-seed0", p, json.dumps(p), tags=tags, artifact_location=art, context_tags=False
        )
        tr.log_metrics({"eval/greedy_acc": 0.5}, 0)
        tr.log_table("per_mu", DARO0)
        tr.finish()
        ids.append(tr.run_id)
    rep = write_report(uri=uri, run_ids=ids, out_dir=tmp_path / "rep", figures=["loss-scale"])
    texts = [p.read_text(errors="ignore") for p in (tmp_path / "rep").rglob("*") if p.suffix in (".html", ".csv")]
    assert texts and not any("/tmp/" in t for t in texts)
    assert any("inputs/optimal-static-seed0-weights.json" in t for t in texts)
    assert json.loads((tmp_path / "rep" / "inputs" / "optimal-static-seed0-weights.json").read_text()) == weights
    assert rep.html.is_file()


def test_plot_and_report_refuse_an_out_that_is_a_file_before_reading_runs(store, tmp_path):
    (tmp_path / "f").write_text("x")
    for args in (("plot", "loss-scale"), ("report",)):
        r = _cli(*args, "--experiment", "full", "--tracking-uri", store["uri"], "--out", str(tmp_path / "f" / "sub"))
        assert r.exit_code == 2 and f"--out {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file" in r.output, r.output


@pytest.mark.parametrize("lo,hi", [(1, 10), (0.85, 1.9), (0.9, 1.05), (0.99, 1.003), (1e-6, 10), (0.2, 80), (3, 3.5)])
def test_log_ticks_label_the_plotted_range_whatever_it_spans(lo, hi):
    """A log axis gets 3 to 8 ticks inside its range, spread over it (not only the powers of ten)."""
    import numpy as np

    from analyses.style import log_ticks

    t = log_ticks(lo, hi)
    assert 3 <= len(t) <= 8 and all(lo * (1 - 1e-9) <= x <= hi * (1 + 1e-9) for x in t)
    assert np.log(t[-1] / t[0]) >= 0.4 * np.log(hi / lo)  # the ticks cover most of the range


def test_coinciding_curves_are_found():
    import numpy as np

    from analyses.style import coinciding

    x = np.linspace(0, 1, 5)
    assert coinciding({"a": x, "b": x + 1e-4, "c": x + 0.1}, 1e-3) == [("a", "b")]
