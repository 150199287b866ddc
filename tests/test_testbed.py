"""The synthetic testbed (daro_lab/testbed): its policy, its token rows against the loss library's analytic values,
its runs, the grid's statistics and the command's bad input."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from daro_lab.algorithms import LossSettings, compute_advantages, kept_prompts, loss_terms
from daro_lab.cli import app
from daro_lab.record import mu_key
from daro_lab.testbed import ARMS, Arm, SyntheticPolicy, TestbedConfig, run_seed
from daro_lab.testbed.grid import Cell, cells, run_grid, summarize, to_markdown
from daro_lab.testbed.loop import token_batch
from daro_lab.testbed.model import RIGHT

K = 8


def _sampled(cfg: TestbedConfig, seed: int = 0):
    """A policy, its pool's logits, K sampled answers per prompt and their rewards, all prompts of the pool."""
    policy = SyntheticPolicy(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    P = len(policy.level)
    logits = policy(torch.arange(P))
    answers = torch.multinomial(torch.softmax(logits.detach(), -1), cfg.K, replacement=True, generator=gen)
    return policy, logits, answers, RIGHT[answers].float()


def test_the_start_puts_each_level_at_its_pass_rate_and_run_on_share():
    cfg = TestbedConfig(start_jitter=0.0, levels="0.9,0.5,0.1", level_mix="1,2,1", prompts=8, prompts_per_step=4)
    policy = SyntheticPolicy(cfg, seed=3)
    acc, per_level = policy.accuracy()
    assert per_level == pytest.approx([0.9, 0.5, 0.1], abs=1e-6)
    assert acc == pytest.approx((2 * 0.9 + 4 * 0.5 + 2 * 0.1) / 8, abs=1e-6)
    assert cfg.level_sizes() == [2, 4, 2]
    p = torch.softmax(policy().detach(), -1)
    assert float(p[0, 1] / p[0, :2].sum()) == pytest.approx(cfg.run_on_right, abs=1e-6)  # right answers run on
    assert float(p[0, 3] / p[0, 2:].sum()) == pytest.approx(cfg.run_on_wrong, abs=1e-6)


def test_mass_per_group_is_the_closed_form_at_equal_lengths():
    """On-policy, equal lengths, group-std advantages (unbiased std): the token-mean of |A| over a group is
    2 mu(1-mu) / sigma with sigma = sqrt(K/(K-1) mu(1-mu)), whatever the lengths' common value."""
    cfg = TestbedConfig(len_short=5, len_run_on=5, prompts=200, prompts_per_step=200, levels="0.7,0.4", level_mix="1,1")
    policy, logits, answers, rewards = _sampled(cfg)
    keep = kept_prompts(rewards)
    adv = compute_advantages(rewards[keep], "group_std")
    batch = token_batch(logits[keep], answers[keep], policy.lengths[keep], rewards[keep], adv)
    m = loss_terms("grpo", batch, K, LossSettings()).metrics
    seen = 0
    for k in range(1, K):
        key = f"mass/{mu_key(k, K)}"
        if key in m:
            mu = k / K
            assert m[key] == pytest.approx(2 * mu * (1 - mu) / math.sqrt(K / (K - 1) * mu * (1 - mu)), rel=1e-5)
            seen += 1
    assert seen >= 5


@pytest.mark.parametrize("method", ["grpo", "dapo", "dr_grpo"])
def test_the_policy_gradient_through_the_loss_library_is_the_analytic_one(method):
    """Answer i has L_i tokens of log-prob log pi(a_i) / L_i, so a loss whose coefficient on response i's tokens is
    c_i has the theta_p-gradient -sum_i c_i A_i (e_{a_i} - pi_p) (sharing 0: theta_p moves prompt p's logits only):
    grpo c_i = 1 / (n L_i), dapo 1 / tokens, dr_grpo 1 / (n L_max)."""
    cfg = TestbedConfig(prompts=24, prompts_per_step=24, len_short=3, len_run_on=11, level_length_growth=0.5)
    policy, _, answers, rewards = _sampled(cfg, seed=1)
    keep = kept_prompts(rewards)
    idx = torch.nonzero(keep).flatten()
    adv = compute_advantages(rewards[keep], "group_std" if method != "dr_grpo" else "mean_only")
    L_max = int(policy.lengths.max())
    batch = token_batch(policy(idx), answers[keep], policy.lengths[idx], rewards[keep], adv)
    t = loss_terms(method, batch, K, LossSettings(max_response_length=L_max))
    (grad,) = torch.autograd.grad(t.loss, [policy.theta])
    lengths = policy.lengths[idx].gather(1, answers[keep]).double()  # [n, K]
    n = float(len(idx) * K)
    coef = {
        "grpo": 1 / (n * lengths),
        "dapo": torch.full_like(lengths, 1 / float(lengths.sum())),
        "dr_grpo": torch.full_like(lengths, 1 / (n * L_max)),
    }[method]
    pi = torch.softmax(policy(idx).detach().double(), -1)  # [n, 4]
    onehot = torch.nn.functional.one_hot(answers[keep], 4).double()  # [n, K, 4]
    expected = torch.zeros_like(policy.theta, dtype=torch.float64)
    expected[idx] = -(coef[..., None] * adv.double()[..., None] * (onehot - pi[:, None, :])).sum(1)
    assert torch.allclose(grad.double(), expected, rtol=1e-4, atol=1e-8)
    assert grad[~keep].abs().max() == 0  # prompts not kept (and not sampled) get nothing


def test_fixed_lengths_keep_the_run_on_shares_and_learned_lengths_change_them():
    for lengths in ("fixed", "learned"):
        rec = run_seed(TestbedConfig(steps=30, grad_every=0, lr=0.05, lengths=lengths), ARMS["dapo"], 0)
        assert rec.acc[-1] > rec.acc[0] + 0.05  # it learns either way
        (right0, wrong0), (right1, wrong1) = rec.run_on
        assert wrong0 == pytest.approx(0.7, abs=0.01) and right0 == pytest.approx(0.2, abs=0.01)
        moved = max(abs(right1 - right0), abs(wrong1 - wrong0))
        assert (moved < 1e-5) if lengths == "fixed" else (moved > 0.01), (lengths, moved)


def test_sharing_sets_the_alignment_of_the_groups_gradients():
    iso = run_seed(TestbedConfig(sharing=0.0, steps=20, grad_every=5), ARMS["grpo"], 0)
    shared = run_seed(TestbedConfig(sharing=1.0, steps=20, grad_every=5), ARMS["grpo"], 0)
    assert np.nanmax(np.abs(iso.cosine)) < 1e-6  # disjoint parameters: orthogonal by construction
    assert np.nanmean(shared.cosine) > 0.5  # one shared vector: the groups push the same way


def test_a_run_is_deterministic_and_daro_weights_move_while_frozen_ones_do_not():
    cfg = TestbedConfig(steps=40, grad_every=0)
    a, b = run_seed(cfg, ARMS["daro-mass"], 4), run_seed(cfg, ARMS["daro-mass"], 4)
    assert np.array_equal(a.acc, b.acc) and a.weights == b.weights
    assert max(abs(w - 1) for w in a.weights.values()) > 0.05
    frozen = run_seed(cfg, ARMS["frozen-1"], 4)
    assert frozen.weights == {k: 1.0 for k in range(1, K)}


def test_an_always_binding_clip_is_recorded_and_no_clip_never_is():
    on = run_seed(TestbedConfig(steps=10, grad_clip=1e-6, grad_every=0), ARMS["grpo"], 0)
    off = run_seed(TestbedConfig(steps=10, grad_every=0), ARMS["grpo"], 0)
    assert np.nanmin(on.clipped) == 1 and np.nanmax(off.clipped) == 0
    assert np.nanmin(on.grad_norm) > 1e-6


def test_the_grid_pairs_arms_by_seed_and_prints_the_mdd(tmp_path):
    grid = cells(sharing=[0.0, 1.0])
    base = TestbedConfig(steps=25, grad_every=0)
    rows = run_grid(grid, ["grpo", "dapo", "frozen-1"], [0, 1, 2, 3], base)
    assert len(rows) == 2 * 3 * 4
    s = summarize(rows, "grpo")
    assert set(s.arm) == {"grpo", "dapo", "frozen-1"} and len(s) == 6
    other = s[s.arm != "grpo"]
    assert (other.pairs == 4).all() and np.isfinite(other.mdd).all() and (other.mdd > 0).all()
    # the paired difference is the mean of the per-seed differences, recomputed here from the rows
    r = rows[rows.sharing == 0.0]
    d = (r[r.arm == "dapo"].set_index("seed").auc - r[r.arm == "grpo"].set_index("seed").auc).mean()
    assert other[(other.arm == "dapo") & (other.sharing == 0.0)]["diff"].item() == pytest.approx(d)
    md = to_markdown(
        s,
        {
            "reference": "grpo",
            "seeds": 4,
            "steps": 25,
            "K": 8,
            "prompts_per_step": 16,
            "prompts": 64,
            "seconds": 1.0,
            "workers": 1,
        },
    )
    assert "MDD" in md and "sharing 1, adam, uniform, lengths learned" in md and "DARO, frozen w (w = 1)" in md


@pytest.mark.slow
def test_two_workers_give_the_rows_one_process_gives():
    grid = [Cell()]
    base = TestbedConfig(steps=15, grad_every=5)
    one = run_grid(grid, ["grpo", "daro-mass"], [0, 1], base, workers=1)
    two = run_grid(grid, ["grpo", "daro-mass"], [0, 1], base, workers=2)
    pd.testing.assert_frame_equal(one, two)


def test_bad_knobs_name_themselves():
    with pytest.raises(ValueError, match="levels"):
        TestbedConfig(levels="0.5,1.2")
    with pytest.raises(ValueError, match="level_mix"):
        TestbedConfig(level_mix="1,1")
    with pytest.raises(ValueError, match="level_mix"):
        TestbedConfig(level_mix="1,1,1,0")
    with pytest.raises(ValueError, match=r"prompts: 4 leave level\(s\) \[3\]"):
        TestbedConfig(prompts=4, prompts_per_step=4, level_mix="8,4,2,1")
    with pytest.raises(ValueError, match="sharing"):
        TestbedConfig(sharing=float("nan"))
    with pytest.raises(ValueError, match="prompts_per_step"):
        TestbedConfig(prompts=8, prompts_per_step=9)
    with pytest.raises(ValueError, match="unknown method"):
        Arm("x", "nope")
    with pytest.raises(ValueError, match="regime"):
        cells(regime=["adamw"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seeds", "1"], "--seeds"),
        (["--arms", "grpo,foo"], "foo"),
        (["--mix", "flat"], "mix"),
        (["--steps", "0"], "steps"),
        (["--sharing", "2"], "sharing"),
        (["--reference", "lipo"], "--reference"),
        (["--workers", "0"], "--workers"),
        (["--sharing", "x"], "--sharing"),
    ],
)
def test_the_command_refuses_bad_input_with_exit_2_naming_it(args, needle, tmp_path):
    res = CliRunner().invoke(app, ["testbed", *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_the_command_writes_its_tables_summary_and_figure(tmp_path):
    out = tmp_path / "tb"
    res = CliRunner().invoke(
        app,
        [
            "testbed",
            "--arms",
            "grpo,daro-mass",
            "--seeds",
            "3",
            "--steps",
            "12",
            "--sharing",
            "1",
            "--regime",
            "adam+clip",
            "--mix",
            "easy-heavy",
            "--lengths",
            "fixed",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    per_run = pd.read_csv(out / "testbed_per_run.csv")
    assert len(per_run) == 6 and set(per_run.regime) == {"adam+clip"} and (per_run.clipped == 1).all()
    md = (out / "testbed_auc.md").read_text()
    assert "DARO (mass, C=auto, lr_w 0.01)" in md and "easy-heavy" in md
    assert (out / "testbed.png").stat().st_size > 10_000
    diffs = pd.read_csv(out / "testbed_diffs.csv")
    assert list(diffs.arm) == ["daro-mass"]
    # the summaries and the figure again, from the runs alone, into another folder: the same tables
    again = tmp_path / "again"
    res = CliRunner().invoke(app, ["testbed", "--from-runs", str(out), "--out", str(again)])
    assert res.exit_code == 0, res.output
    assert (again / "testbed_auc.md").read_text() == md and (again / "testbed.png").exists()
    res = CliRunner().invoke(app, ["testbed", "--from-runs", str(tmp_path / "nothing"), "--out", str(again)])
    assert res.exit_code == 2 and "--from-runs" in res.output and "testbed_per_run.csv" in res.output
