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
        (["rollout.num_responses=1"], "'rollout.num_responses': must be an integer >= 2, got 1"),
        (["algo.daro.signal=loss"], "'algo.daro.signal'"),
        (["algo=3"], "'algo' is a section"),
        (["noequals"], "not of the form"),
        (["trainer.mini_batch_prompts=5"], "'trainer.mini_batch_prompts': must divide"),
        (["tracking.log_every=0"], "'tracking.log_every': must be an integer >= 1, got 0"),
        (["trainer.parallel=zero3"], "'trainer.parallel': expected 'ddp' or 'fsdp', got 'zero3'"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, overrides)


# Values that used to pass validation and then crashed, hung or trained on something else: each must be refused
# by load_config, naming the key and the value.
BAD_VALUES = [
    ("trainer.lr=-1", "'trainer.lr': must be a finite number >= 0, got -1.0"),
    ("trainer.lr=nan", "'trainer.lr': must be a finite number >= 0, got nan"),
    ("trainer.lr=inf", "'trainer.lr': must be a finite number >= 0, got inf"),
    ("trainer.weight_decay=nan", "'trainer.weight_decay': must be a finite number >= 0, got nan"),
    ("trainer.steps=0", "'trainer.steps': must be an integer >= 1, got 0"),
    ("trainer.steps=-3", "'trainer.steps': must be an integer >= 1, got -3"),
    ("trainer.eval_samples=0", "'trainer.eval_samples': must be an integer >= 1, got 0"),
    ("trainer.device=banana", "'trainer.device': not a torch device: 'banana'"),
    ("trainer.betas=[0.9, 1.5]", r"'trainer.betas\[1\]': must be a finite number in \[0, 1\), got 1.5"),
    ("rollout.temperature=0", r"'rollout.temperature': must be a finite number in \[0.01, 100\], got 0.0"),
    ("rollout.temperature=nan", r"'rollout.temperature': must be a finite number in \[0.01, 100\], got nan"),
    ("rollout.temperature=1e-300", r"'rollout.temperature': must be a finite number in \[0.01, 100\], got 1e-300"),
    ("algo.kl_beta=1e300", r"'algo.kl_beta': must be a finite number in \[0, 100\], got 1e\+300"),
    ('tracking.experiment=""', "'tracking.experiment': an MLflow experiment needs a name, got an empty string"),
    ("rollout.top_p=1.5", r"'rollout.top_p': must be a finite number in \(0, 1\], got 1.5"),
    ("rollout.top_p=0", r"'rollout.top_p': must be a finite number in \(0, 1\], got 0.0"),
    ("rollout.max_new_tokens=0", "'rollout.max_new_tokens': must be an integer >= 1, got 0"),
    ("algo.eps_high=nan", "'algo.eps_high': must be a finite number >= 0, got nan"),
    ("algo.kl_beta=nan", r"'algo.kl_beta': must be a finite number in \[0, 100\], got nan"),
    ("algo.daro.lr_w=-1e-3", "'algo.daro.lr_w': must be a finite number >= 0, got -0.001"),
    ("model.num_heads=0", "'model.num_heads': must be an integer >= 1, got 0"),
    ("model.num_heads=3", r"'model.num_heads': must divide model.hidden_size \(64\), got 3"),
    ("model.arch=gpt2", "'model.arch': expected 'llama' or 'qwen2', got 'gpt2'"),
    ("task.name=sudoku", "'task.name': unknown task 'sudoku'; choose one of arithmetic, chain, file, math"),
    ("task.max_digits=0", "'task.max_digits': must be an integer >= 1, got 0"),
    ("task.ops=['/']", r"'task.ops\[0\]': expected one of '\+', '-', '\*', got '/'"),
    ("task.ops=[]", r"'task.ops': expected a non-empty list drawn from '\+', '-', '\*', got \[\]"),
    ("task.long_prompts=cut", "'task.long_prompts': expected 'error' or 'drop', got 'cut'"),
    ("eval.top_p=0", r"'eval.top_p': must be a finite number in \(0, 1\], got 0.0"),
    ("rollout.engine=sglang", "'rollout.engine': expected 'hf' or 'vllm', got 'sglang'"),
    ("algo.std=biased", "'algo.std': expected 'unbiased' or 'population', got 'biased'"),
    ("algo.daro.param=exp", "'algo.daro.param': expected 'log' or 'direct', got 'exp'"),
    ("algo.daro.reg=Auto", "'algo.daro.reg': expected a number or 'auto', got 'Auto'"),
    ("algo.daro.reg=0", "'algo.daro.reg': must be a finite number > 0, got 0.0"),
    ("algo.daro.signal_ema=1", r"'algo.daro.signal_ema': must be a finite number in \[0, 1\), got 1.0"),
    ("model.dtype=fp8", "'model.dtype': expected one of 'float32', 'bfloat16', 'float16', 'auto', got 'fp8'"),
    ("trainer.lr_schedule=linear", "'trainer.lr_schedule': expected 'constant' or 'cosine', got 'linear'"),
    ("task.answer_extract=last", "'task.answer_extract': expected one of 'auto', 'none', 'boxed', got 'last'"),
    ("eval.reward=gsm8k", "'eval.reward': unknown task 'gsm8k'; choose one of arithmetic, chain, file, math"),
    ("rollout.engine=1", "'rollout.engine': expected 'hf' or 'vllm', got 1"),
    ("seed=-1", "'seed': must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_naming_key_and_value(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_every_numeric_field_declares_its_range():
    """Range checks are declared on the fields (config._f(..., range=...)), so a new numeric key cannot skip them."""
    import dataclasses
    import typing

    from daro_lab.fields import Range

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", tp, f.metadata.get("range")

    numeric = [
        (k, r) for k, tp, r in walk(Config) if {int, float} & set(typing.get_args(tp) or (tp,)) or tp == list[float]
    ]
    assert len(numeric) > 40
    assert all(isinstance(r, Range) for _, r in numeric), [k for k, r in numeric if r is None]


def test_bad_value_from_the_cli_exits_2_before_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = [
        "--set",
        "model.warmstart_steps=1",
        "--set",
        "trainer.steps=1",
        "--set",
        "task.num_train=8",
    ]  # cheap if accepted
    res = runner.invoke(
        app, ["train", "--set", "rollout.top_p=1.5", *small, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    assert res.exit_code == 2 and "'rollout.top_p'" in res.output and "1.5" in res.output, res.output
    assert not (tmp_path / "m.db").exists()  # not even the store was opened


def test_config_file_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes("[tracking]\nrun_name = 'caf\xe9'\n".encode("latin-1"))
    res = runner.invoke(app, ["config", "--config", str(p)])
    assert res.exit_code == 2 and "latin1.toml is not UTF-8" in res.output, res.output


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
