"""The loss-scale simulator (daro_lab.simulate, `daro-lab simulate`): its compact path equals the per-token one,
it is deterministic, the baselines' shapes follow the given lengths, and which DARO readings reach their fixed
point follows lr_w x updates."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.simulate import Reading, SimConfig, reach_limit, simulate

LC, LW = [10, 10, 9, 8, 6, 5, 5], [17, 16, 15, 15, 16, 16, 19]  # like the chain task: wrong answers run on


def test_compact_batches_equal_one_column_per_token():
    """With rho = 1 every token of a response is alike: one column weighted by the length gives the same S, C,
    L, mass and weights as one column per token."""
    cfg = SimConfig(len_correct=LC, len_wrong=LW, prompts=4, updates=2, readings=["abs:1", "mass:auto:0.5"])
    a, b = simulate(cfg, compact=True).groups, simulate(cfg, compact=False).groups
    cols = ["scale", "contrib", "contrib_offset", "loss", "mass", "daro/weight_used", "daro/signal", "daro/wS"]
    assert a[["run", "update", "k"]].equals(b[["run", "update", "k"]])
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-9, atol=1e-12)


def test_same_config_same_numbers_and_seed_matters():
    cfg = SimConfig(len_correct=LC, len_wrong=LW, prompts=8, updates=5, readings=["mass:1"])
    a, b = simulate(cfg).groups, simulate(cfg).groups
    assert a.equals(b)
    c = simulate(SimConfig(len_correct=LC, len_wrong=LW, prompts=8, updates=5, readings=["mass:1"], seed=1)).groups
    assert not np.allclose(a.scale.to_numpy(), c.scale.to_numpy()[: len(a)]) or len(a) != len(c)


def test_baseline_shapes_follow_the_given_lengths():
    """Lengths that differ between right and wrong answers but not across mu leave DAPO on its equal-length
    shape (the length factor is common to all groups); lengths that change with mu move it off, onto the
    length-corrected shape. GRPO stays on its shape in both."""

    def shares(lc, lw):
        s = simulate(SimConfig(len_correct=lc, len_wrong=lw, prompts=64, updates=20, readings=[], len_cv=0.0)).summary()
        return s.set_index(["run", "k"])

    flat = shares(400, 600)
    for m in ("dapo", "grpo"):
        np.testing.assert_allclose(flat.loc[m].S_share, flat.loc[m].equal_length_share, atol=0.01)
    varying = shares(LC, LW)
    np.testing.assert_allclose(varying.loc["grpo"].S_share, varying.loc["grpo"].equal_length_share, atol=0.01)
    d = varying.loc["dapo"]
    np.testing.assert_allclose(d.S_share, d.length_corrected_share, atol=0.01)
    assert (d.S_share - d.equal_length_share).abs().max() > 0.01  # ~0.015 here: L+ + L- runs from 27 to 21
    assert varying.loc["grpo"].C_abs_share.isna().all()  # at rho = 1 GRPO's loss is 0 up to rounding


def test_which_readings_reach_their_fixed_point():
    """At the paper's lr_w 1e-3, |ln w| moves at most ~0.6 in the paper's 600 updates: the paper's reading
    (|L_mu|, C = 1, fixed points 1/|L_mu| up to ~8 for the hard groups, whose |L_mu| is small) leaves those
    far from it; the 'mass' reading with C = 'auto' (fixed points near 1) gets six of seven groups to within 1%,
    the seventh (w* ~ 1.76, |ln w*| 0.56: at the edge of the reach) to within 15%."""
    assert reach_limit(1e-3, 600) == pytest.approx(0.6)
    s = simulate(
        SimConfig(
            len_correct=LC,
            len_wrong=LW,
            prompts=16,
            updates=600,
            readings=["abs:1", "mass:auto"],
            methods=[],
            lr_w=1e-3,
        )
    ).summary()
    paper = s[s.run == "daro[abs, C=1]"]
    mass = s[s.run == "daro[mass, C=auto]"]
    assert (paper.wS - 1).abs().max() > 0.5 and paper.w_final.max() < np.exp(0.6) * 1.01
    assert (mass.wS - 1).abs().max() < 0.15 and ((mass.wS - 1).abs() < 0.01).sum() >= 6
    assert mass.w_final.max() / mass.w_final.min() > 1.2  # the groups' fixed points differ


def test_reading_parse_errors_name_the_part():
    assert Reading.parse("mass:auto:0.9") == Reading("mass", "auto", 0.9)
    for bad, needle in (
        ("nope", "signal one of"),
        ("abs:zero", "reg must be"),
        ("abs:-1", "reg must be"),
        ("abs:1:1.5", "ema must be"),
    ):
        with pytest.raises(ValueError, match=needle):
            Reading.parse(bad)


def test_cli_prints_tables_writes_the_figure_and_rejects_bad_lengths(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "simulate",
            "--updates",
            "4",
            "--prompts",
            "8",
            "--reading",
            "mass:auto",
            "--len-correct",
            ",".join(map(str, LC)),
            "--len-wrong",
            "600",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "daro[mass, C=auto]" in r.output and "length_corrected_share" in r.output
    assert (tmp_path / "simulate.png").stat().st_size > 0 and (tmp_path / "simulate_summary.csv").is_file()
    bad = CliRunner().invoke(app, ["simulate", "--len-correct", "1,2,3", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "len_correct" in bad.output and "K-1 = 7" in bad.output
    bad = CliRunner().invoke(app, ["simulate", "--len-wrong", "six", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--len-wrong" in bad.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--ratio-noise", "-1"], "--ratio-noise (ratio_noise): a finite number in [0, 10]"),
        (["--len-cv", "-1"], "--len-cv (len_cv): a finite number in [0, 10]"),
        (["--len-cv", "nan"], "--len-cv (len_cv)"),
        (["--len-correct", "inf"], "--len-correct (len_correct): mean lengths must be between 1 and max_len = 4096"),
        (["--len-wrong", "5000"], "--len-wrong (len_wrong): mean lengths must be between 1 and max_len"),
        (["--lr-w", "inf"], "--lr-w (lr_w): a finite number > 0"),
        (["--lr-w", "0"], "--lr-w (lr_w)"),
        (["--mu-weights", "1,1,nan,1,1,1,1"], "--mu-weights (mu_weights): K-1 = 7 finite non-negative"),
        (["--k", "100000"], "--k (K): an integer in [2, 1024]"),
        (["--updates", "100000000"], "--updates (updates): an integer in [1, 1000000]"),
        (["--reading", "abs:-1"], "reg must be"),
    ],
)
def test_cli_refuses_every_bad_value_before_computing_naming_the_option(tmp_path, args, needle):
    r = CliRunner().invoke(app, ["simulate", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "o").exists()  # nothing computed, nothing written


def test_cli_checks_out_before_computing_and_shows_progress_on_long_work(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(app, ["simulate", "--updates", "4", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output
    seen = {}
    import daro_lab.simulate as sim

    real = sim.simulate

    def spy(cfg, compact=True, progress=False):
        seen["progress"] = progress
        return real(sim.SimConfig(**{**cfg.__dict__, "updates": 2}), compact, progress)

    monkeypatch.setattr(sim, "simulate", spy)
    r = CliRunner().invoke(app, ["simulate", "--updates", "50000", "--prompts", "4", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and seen["progress"] is True, r.output


def test_daro_mass_with_auto_C_converges_to_the_closed_form_static_weights():
    """The claim behind 'shape:mass': DARO with the 'mass' reading and C = auto reaches w = c / sqrt(mu(1-mu)) with
    harmonic mean 1 (at equal lengths, rho = 1). Learned by the real loss and AdamW in the simulator, compared with
    the closed form; an 'abs' reading's weights are not that shape (the test can tell them apart)."""
    from daro_lab.trainer.setup import mass_fixed_point_weights

    closed = mass_fixed_point_weights(8)
    assert closed[4] == pytest.approx(0.428 / 0.5, rel=1e-3)  # 0.428 / sqrt(mu(1-mu)) at K = 8
    assert sum(1 / w for w in closed.values()) / 7 == pytest.approx(1.0)  # harmonic mean 1
    s = simulate(
        SimConfig(
            len_correct=100,
            len_wrong=100,
            len_cv=0.0,
            prompts=64,
            updates=1500,
            lr_w=1e-2,
            readings=["mass:auto", "abs:auto"],
            methods=[],
        )
    ).summary()
    mass = s[s.run == "daro[mass, C=auto]"].set_index("k").w_final
    for k, w in closed.items():
        assert mass[k] == pytest.approx(w, rel=0.03), (k, mass.round(3).to_dict(), closed)
    absr = s[s.run == "daro[abs, C=auto]"].set_index("k").w_final
    assert max(abs(absr[k] / w - 1) for k, w in closed.items()) > 0.1
