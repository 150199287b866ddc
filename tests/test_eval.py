"""Evaluation: avg@k and the unbiased pass@k, the paper's table layout, `daro-lab eval` on models and runs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from _tiny_hf import make_model_dir, write_jsonl
from typer.testing import CliRunner

from daro_lab.config import ConfigError, load_config
from daro_lab.eval import (
    BenchResult,
    avg_at_n,
    evaluate_benchmark,
    long_table,
    mean_pass_at_k,
    paper_table,
    parse_spec,
    pass_at_k,
    pass_ks,
    to_markdown,
)
from daro_lab.eval.bench import Benchmark, benchmark_metrics
from daro_lab.rollout import RolloutBatch
from daro_lab.tasks import Problem

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Metrics


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of the n samples holds a correct one, by enumeration."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 2), (8, 3, 4), (8, 0, 8), (8, 8, 1), (10, 3, 4), (6, 5, 2)]
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_avg_and_bad_arguments():
    assert mean_pass_at_k(8, [0, 3, 8], 1) == pytest.approx(avg_at_n(8, [0, 3, 8])) == pytest.approx(11 / 24)
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# ---------------------------------------------------------------------------------------------
# Evaluating a policy (a scripted engine: exact numbers)


class Words:
    """Tokenizer stand-in: one id per word."""

    pad_token_id, eos_token_id = 0, 1
    words = ["<pad>", "<eos>", "right", "wrong"]

    def encode_prompts(self, prompts):
        return [[2] for _ in prompts]

    def decode_responses(self, ids):
        return [self.words[int(r[0])] for r in ids]


class ScriptedEngine:
    """Returns, for problem i, `script[i]` (a list of n booleans: right/wrong) as responses."""

    def __init__(self, script):
        self.script = script
        self.offset = 0
        self.calls = []

    def generate(self, prompts, n, *, max_new_tokens, temperature, top_p, generator, greedy):
        self.calls.append((len(prompts), n, greedy, temperature, top_p))
        rows = []
        for i in range(len(prompts)):
            rows += [[2 if ok else 3, 1] for ok in self.script[self.offset + i][:n]]
        self.offset += len(prompts)
        ids = torch.tensor(rows)
        B = len(rows)
        return RolloutBatch(
            torch.ones(B, 1, dtype=torch.long),
            torch.ones(B, 1, dtype=torch.bool),
            ids,
            torch.ones(B, 2, dtype=torch.bool),
            torch.zeros(B, 2),
            torch.arange(len(prompts)).repeat_interleave(n),
        )


def exact(responses, answers):
    return [1.0 if r == a else 0.0 for r, a in zip(responses, answers)]


def test_evaluate_benchmark_counts_and_metrics():
    script = [
        [True, False, False, False],
        [True, True, True, True],
        [False] * 4,
        [False, False, True, True],
        [True, False, True, False],
    ]
    bench = Benchmark("B", "b.jsonl", [Problem(f"p{i}", "right", i % 2) for i in range(5)])
    eng = ScriptedEngine(script)
    r = evaluate_benchmark(
        eng,
        Words(),
        exact,
        bench,
        n=4,
        greedy=False,
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=8,
        batch_size=2,
        seed=0,
    )
    assert r.correct == [1, 4, 0, 2, 2] and [c[0] for c in eng.calls] == [2, 2, 1]  # batches of 2 prompts
    m = r.metrics()
    assert m["avg_at_4"] == pytest.approx((1 + 4 + 0 + 2 + 2) / 20)
    assert m["pass_at_1"] == pytest.approx(m["avg_at_4"])
    assert m["pass_at_2"] == pytest.approx(sum(brute_pass_at_k(4, c, 2) for c in r.correct) / 5)
    assert m["pass_at_4"] == pytest.approx(4 / 5)
    assert r.mean_length == 2.0 and len(r.samples) == 4
    g = evaluate_benchmark(
        ScriptedEngine(script),
        Words(),
        exact,
        bench,
        n=4,
        greedy=True,
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=8,
        batch_size=8,
        seed=0,
    )
    assert g.n == 1 and g.metrics() == {"greedy": pytest.approx(3 / 5)}


def test_paper_table_layout_and_markdown():
    res = {
        "grpo": [
            BenchResult("MATH500", 4, False, [4, 0], [1, 2], 10.0),
            BenchResult("AIME24", 4, False, [1, 1], [0, 0], 20.0),
        ],
        "daro": [
            BenchResult("MATH500", 4, False, [4, 2], [1, 2], 10.0),
            BenchResult("AIME24", 4, False, [2, 2], [0, 0], 20.0),
        ],
    }
    long = long_table(res)
    assert set(long.metric) == {"avg_at_4", "pass_at_1", "pass_at_2", "pass_at_4"}
    wide = paper_table(long, "avg_at_4")
    assert list(wide.columns) == ["method", "MATH500", "AIME24", "Avg"]
    assert list(wide.method) == ["grpo", "daro"]
    assert wide.set_index("method").loc["daro"].tolist() == pytest.approx([75.0, 50.0, 62.5])
    md = to_markdown(wide, "avg@4")
    assert "| method | MATH500 | AIME24 | Avg |" in md and "| daro | 75.0 | 50.0 | 62.5 |" in md
    m = benchmark_metrics(res["daro"], prefix="daro/")
    assert m["daro/MATH500/avg_at_4"] == 0.75 and m["daro/avg/avg_at_4"] == pytest.approx(0.625)


def test_benchmark_specs():
    assert parse_spec("MATH500 = data/x.jsonl") == ("MATH500", "data/x.jsonl")
    for bad in ("MATH500", "=x.jsonl", "bad name=x.jsonl", "a@b=x.jsonl"):
        with pytest.raises(ConfigError):
            parse_spec(bad)
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[0\]"):
        load_config(None, ["eval.benchmarks=['nopath']"])
    with pytest.raises(ConfigError, match="eval.reward"):
        load_config(None, ["eval.reward=bogus"])


# ---------------------------------------------------------------------------------------------
# Real models: the trainer's evaluation, `daro-lab eval --model` and `--run`


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    make_model_dir(d / "modelA", arch="qwen2", tie=False, seed=0)
    make_model_dir(d / "modelB", arch="llama", tie=True, pad=False, seed=1)
    write_jsonl(
        d / "b1.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1), "level": i % 3} for i in range(5)]
    )
    write_jsonl(d / "b2.jsonl", [{"problem": f"Compute {i}*3.", "answer": i * 3} for i in range(3)])
    return d


def test_trainer_evaluation_runs_the_configured_benchmarks(env):
    from daro_lab.rollout.hf import HFEngine
    from daro_lab.tasks import get_task
    from daro_lab.trainer.evaluate import evaluate
    from daro_lab.trainer.setup import load_model_and_tokenizer

    cfg = load_config(
        None,
        [
            f"model.path={env / 'modelA'}",
            "model.prompt_template=qwen_math",
            "rollout.max_new_tokens=4",
            f"eval.benchmarks=['B1={env / 'b1.jsonl'}']",
            "eval.k=2",
            "eval.reward=file",
        ],
    )
    model, tok = load_model_and_tokenizer(cfg)
    engine = HFEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    problems = [Problem("What is 1+1?", "2", 1)]
    m, table = evaluate(model, engine, tok, get_task("file"), problems, cfg, seed=0)
    assert {"eval/greedy_acc", "bench/B1/avg_at_2", "bench/B1/pass_at_2", "bench/avg/avg_at_2"} <= set(m)
    assert table and table[0]["level"] == 1


def _eval_run_of(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("daro-lab-eval")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def _fake_training_run(uri: str, model_dir: Path, tmp: Path) -> tuple[str, dict]:
    """An MLflow run the way train() leaves one: config.json + checkpoint/model.safetensors (perturbed weights)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    from daro_lab.tracking import Tracker

    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.prompt_template=chat",
            "algo.method=daro",
            "tracking.run_name=daro-seed0",
            "rollout.max_new_tokens=3",
        ],
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ck = tmp / "ckpt"
    ck.mkdir()
    save_model(model, str(ck / "model.safetensors"))
    tr = Tracker.start(uri, "daro-lab", "daro-seed0", cfg.flat(), cfg.to_json())
    tr.log_artifact(ck, "checkpoint")
    tr.finish("FINISHED")
    return tr.run_id, {k: v.clone() for k, v in model.state_dict().items()}


def test_eval_cli_models_and_runs_logged_in_the_paper_layout(env, tmp_path):
    from daro_lab.cli import app
    from daro_lab.eval.run import Policy, load_policy_for_eval
    from daro_lab.tracking import config_of_run, list_tables, read_table

    uri = f"sqlite:///{env}/mlflow.db"  # one store per module: creating one costs seconds
    run_id, state = _fake_training_run(uri, env / "modelB", tmp_path)

    # --run loads the run's final checkpoint into the run's architecture, with the run's prompt template
    pol = Policy("daro", f"run:{run_id}", config_of_run(uri, run_id), run_id)
    model, tok = load_policy_for_eval(pol, uri)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert tok.template == "chat" and tok.eos_token_id == tok.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.tokenizer.eos_token_id  # no pad token: eos pads

    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(env / "modelA"),
            "--run",
            run_id,
            "--benchmarks",
            f"B1={env / 'b1.jsonl'}",
            "--benchmarks",
            f"B2={env / 'b2.jsonl'}",
            "--k",
            "2",
            "--set",
            "eval.reward=file",
            "--set",
            "eval.max_new_tokens=3",
            "--set",
            "model.prompt_template=qwen_math",
            "--device",
            "cpu",
            "--tracking-uri",
            uri,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| method | B1 | B2 | Avg |" in res.output
    client, runs = _eval_run_of(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    r = runs[0]
    assert r.data.tags["daro_lab.eval_of"] == run_id
    assert (
        r.data.params["policy.modelA"] == f"model:{env / 'modelA'}"
        and r.data.params["policy.daro-seed0"] == f"run:{run_id}"
    )
    assert {"modelA/B1/avg_at_2", "modelA/B2/pass_at_2", "daro-seed0/avg/avg_at_2"} <= set(r.data.metrics)
    wide = read_table(uri, r.info.run_id, "paper_avg_at_2")
    assert list(wide.columns) == ["method", "B1", "B2", "Avg"] and list(wide.method) == ["modelA", "daro-seed0"]
    problems = read_table(uri, r.info.run_id, "problems")
    assert len(problems) == 2 * (5 + 3) and set(problems.samples) == {2}
    assert {"paper_pass_at_1", "paper_pass_at_2", "results", "samples"} <= set(list_tables(uri, r.info.run_id))
    md = Path(client.download_artifacts(r.info.run_id, "eval_table.md", str(tmp_path)))
    assert "| method | B1 | B2 | Avg |" in md.read_text()


def test_eval_bad_input_exits_2_and_creates_no_eval_run(env, tmp_path):
    from daro_lab.cli import app

    uri = f"sqlite:///{env}/mlflow.db"
    before = len(_eval_run_of(uri)[1])
    cases = [
        (["--model", str(env / "modelA"), "--benchmarks", f"B1={tmp_path / 'missing.jsonl'}"], "data file not found"),
        (["--model", str(tmp_path / "nomodel"), "--benchmarks", f"B1={env / 'b1.jsonl'}"], "no such model directory"),
        (["--run", "0123456789abcdef", "--benchmarks", f"B1={env / 'b1.jsonl'}"], "0123456789abcdef"),
        (["--model", str(env / "modelA")], "no benchmarks"),
        (["--benchmarks", f"B1={env / 'b1.jsonl'}"], "nothing to evaluate"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, ["eval", *args, "--tracking-uri", uri])
        assert res.exit_code == 2, res.output
        assert needle in res.output, res.output
    assert len(_eval_run_of(uri)[1]) == before  # bad input fails before a run is created


def test_run_of_the_tiny_preset_loads_without_a_warm_start(env, tmp_path):
    """A run trained from the tiny preset (no model.path): its architecture is rebuilt from the run's config."""
    from safetensors.torch import save_model

    from daro_lab.eval.run import Policy, load_policy_for_eval
    from daro_lab.models import CharTokenizer, build_tiny_model
    from daro_lab.tracking import Tracker, config_of_run

    uri = f"sqlite:///{env}/mlflow.db"
    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64", f"model.cache_dir={tmp_path}/none"])
    model = build_tiny_model(cfg.model, CharTokenizer().vocab_size, seed=123)  # not the init seed: "trained" weights
    (tmp_path / "ck").mkdir()
    save_model(model, str(tmp_path / "ck" / "model.safetensors"))
    tr = Tracker.start(uri, "daro-lab", "tiny", cfg.flat(), cfg.to_json())
    tr.log_artifact(tmp_path / "ck", "checkpoint")
    tr.finish("FINISHED")
    pol = Policy("tiny", f"run:{tr.run_id}", config_of_run(uri, tr.run_id), tr.run_id)
    loaded, tok = load_policy_for_eval(pol, uri)
    for (k, v), w in zip(loaded.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(v, w)
    assert isinstance(tok, CharTokenizer) and not (tmp_path / "none").exists()  # no warm start ran


def test_eval_of_prompts_the_tokenizer_cannot_encode_names_the_row_and_character(env, tmp_path):
    """The tiny preset's character tokenizer knows 15 characters, and its context is 64 positions: a benchmark row
    outside either is named (file, line, character) and nothing is recorded."""
    from daro_lab.cli import app
    from daro_lab.models import CharTokenizer, build_tiny_model

    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=64"])
    tok = CharTokenizer()
    build_tiny_model(cfg.model, tok.vocab_size, seed=0).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    write_jsonl(
        tmp_path / "accent.jsonl", [{"problem": "1+1=", "answer": "2"}, {"problem": "2+\u00e9=", "answer": "3"}]
    )
    write_jsonl(tmp_path / "long.jsonl", [{"problem": "1+" * 40 + "1=", "answer": "41"}])
    uri = f"sqlite:///{env}/mlflow.db"
    before = len(_eval_run_of(uri)[1])
    for bench, needles in [
        ("accent", ["accent.jsonl: line 2", "character '\u00e9' (U+00E9) at position 3"]),
        ("long", ["long.jsonl: line 1", "1 of 1 benchmark B problems are longer than 60 tokens"]),
    ]:
        res = runner.invoke(
            app,
            [
                "eval",
                "--model",
                str(tmp_path / "tiny"),
                "--benchmarks",
                f"B={tmp_path / bench}.jsonl",
                "--set",
                "eval.max_new_tokens=4",
                "--set",
                "eval.reward=arithmetic",
                "--device",
                "cpu",
                "--tracking-uri",
                uri,
            ],
        )
        assert res.exit_code == 2, res.output
        assert all(n in res.output for n in needles), res.output
    assert len(_eval_run_of(uri)[1]) == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_eval_stopped_by_a_signal_marks_its_run_killed_and_exits_128_plus_n(env, tmp_path, monkeypatch, sig):
    """A signal while a policy is evaluated: the eval run is KILLED (not left RUNNING), the exit code says which."""
    import os
    import signal

    from mlflow import MlflowClient

    from daro_lab.cli import app
    from daro_lab.eval import run as eval_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = eval_run.evaluate_on_benchmarks

    def signalled(*a, **k):
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)

    monkeypatch.setattr(eval_run, "evaluate_on_benchmarks", signalled)
    before = signal.getsignal(getattr(signal, sig))
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(env / "modelA"),
            "--benchmarks",
            f"B1={env / 'b1.jsonl'}",
            "--k",
            "1",
            "--set",
            "eval.reward=file",
            "--set",
            "eval.max_new_tokens=2",
            "--set",
            "model.prompt_template=qwen_math",
            "--device",
            "cpu",
            "--tracking-uri",
            uri,
        ],
    )
    assert res.exit_code == 128 + getattr(signal, sig), res.output
    assert f"interrupted ({sig})" in res.output and "marked KILLED" in res.output
    assert signal.getsignal(getattr(signal, sig)) is before  # restored
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("daro-lab-eval").experiment_id])
    assert run.info.status == "KILLED"
