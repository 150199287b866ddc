"""Typed config: TOML in, overrides applied, bad keys and values named in the error."""

import json

import pytest
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.config import Config, ConfigError, describe, load_config

runner = CliRunner()


def test_defaults_follow_the_paper_where_it_speaks():
    cfg = load_config()
    assert (cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.kl_beta) == (0.2, 0.28, 0.0)
    assert cfg.algo.daro.lr_w == 1e-3 and cfg.rollout.num_responses == 8
    assert cfg.algo.daro.param == "log" and cfg.algo.daro.signal == "abs"


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[algo]\nmethod = "dapo"\n[algo.daro]\nlr_w = 1e-2\n[task]\nops = ["+", "*"]\n')
    cfg = load_config(p, ["algo.eps_high=0.3", "trainer.lr=1e-5", "algo.dual_clip=3", "tracking.run_name=x"])
    assert cfg.seed == 3 and cfg.algo.method == "dapo" and cfg.algo.daro.lr_w == 1e-2
    assert cfg.algo.eps_high == 0.3 and cfg.trainer.lr == 1e-5 and cfg.algo.dual_clip == 3.0
    assert cfg.task.ops == ["+", "*"] and cfg.tracking.run_name == "x"
    assert cfg.flat()["algo.daro.lr_w"] == 1e-2


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["algo.eps_hgh=0.3"], "unknown config key 'algo.eps_hgh'"),
        (["trainer.steps=1.5"], "'trainer.steps': expected an integer"),
        (["algo.eps_high=abc"], "'algo.eps_high': expected a number"),
        (["algo.method=ppo"], "'algo.method': unknown method 'ppo'"),
        (["rollout.num_responses=1"], "'rollout.num_responses': K must be >= 2"),
        (["algo.daro.signal=loss"], "'algo.daro.signal'"),
        (["algo=3"], "'algo' is a section"),
        (["noequals"], "not of the form"),
        (["trainer.mini_batch_prompts=5"], "'trainer.mini_batch_prompts': must divide"),
        (["tracking.log_every=0"], "'tracking.log_every': must be >= 1"),
        (["trainer.parallel=zero3"], "'trainer.parallel': expected 'ddp' or 'fsdp', got 'zero3'"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[algo\nmethod = 1")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[trainer]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match="'trainer.steps'.*wrong.toml"):
        load_config(wrong)


def test_every_field_has_help():
    rows = describe(Config)
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_cli_lists_command_groups_and_config_errors_exit_2():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "eval", "run", "plot", "report", "ui", "demo"):
        assert cmd in res.output
    res = runner.invoke(app, ["config", "--set", "algo.method=dapo"])
    assert res.exit_code == 0 and json.loads(res.output)["algo"]["method"] == "dapo"
    res = runner.invoke(app, ["config", "--set", "algo.bogus=1"])
    assert res.exit_code == 2 and "algo.bogus" in res.output


def test_every_experiment_file_loads():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "experiments").rglob("*.toml"))
    assert files
    for f in files:
        if "ablations" in f.parts:
            continue  # grids, not configs
        load_config(f)
