"""experiments/paper/: the paper's setups, each dry-run: config resolved, architecture on the meta device, memory plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daro_lab.cli import app
from daro_lab.config import load_config
from daro_lab.trainer.memory import GIB, plan

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"
FILES = sorted(PAPER.rglob("*.toml"))
MODELS = {  # directory -> (parameters, tied embeddings, template): public model sizes
    "qwen2.5-math-1.5b": (1.544e9, True, "qwen_math"),
    "qwen2.5-math-7b": (7.616e9, False, "qwen_math"),
    "llama-3.1-8b": (8.030e9, False, None),
}
METHODS = ("grpo", "dapo", "dr_grpo", "lipo", "daro")
runner = CliRunner()


def test_the_grid_is_complete():
    have = {(f.parent.name, f.stem) for f in FILES if f.parent != PAPER}
    assert have == {(m, k) for m in MODELS for k in METHODS}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PAPER)))
def test_every_paper_config_dry_runs(path, monkeypatch):
    monkeypatch.chdir(PAPER.parents[1])  # configs name repo-relative arch files
    res = runner.invoke(app, ["train", "--config", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    for needle in (
        "daro-lab dry run",
        "parameters",
        "weights",
        "AdamW states (2 x fp32)",
        "activations, no checkpointing",
        "activations, gradient checkpointing",
        "log-prob logits, unchunked",
        "log-prob logits, chunks of",
    ):
        assert needle in res.output, res.output


@pytest.mark.parametrize("model", sorted(MODELS))
def test_paper_hyperparameters_and_architectures(model, monkeypatch):
    monkeypatch.chdir(PAPER.parents[1])
    n_params, tied, template = MODELS[model]
    for method in METHODS:
        cfg = load_config(PAPER / model / f"{method}.toml")
        r, t, a = cfg.rollout, cfg.trainer, cfg.algo
        assert (a.method, r.num_responses, t.prompts_per_step, t.mini_batch_prompts) == (method, 8, 128, 64)
        assert t.dynamic_sampling and t.dynamic_sampling_max_batches * t.prompts_per_step == 384  # generation batch
        assert (t.lr, a.daro.lr_w, a.eps_low, a.eps_high, a.kl_beta, t.steps) == (1e-6, 1e-3, 0.2, 0.28, 0.0, 300)
        assert r.max_new_tokens == 3000 and r.temperature == 1.0
        assert cfg.model.dtype == "auto" and t.device == "cuda" and cfg.task.name == "math"
        assert cfg.model.gradient_checkpointing and cfg.model.logprob_chunk_size > 0
        if template:
            assert cfg.model.prompt_template == template
        else:
            assert "\\boxed{}" in cfg.model.prompt_template
    p = plan(cfg)
    assert p.params == pytest.approx(n_params, rel=1e-3) and p.tied == tied
    assert p.dtype == "bfloat16"
    # mixed precision (the default): fp32 masters and AdamW states (vLLM generates from its own copy)
    assert p.mixed and p.gib["weights"] == pytest.approx(p.params * 4 / GIB)
    assert p.gib["adamw_states_fp32"] == pytest.approx(p.params * 8 / GIB) and "generation_copy" not in p.gib
    assert not any("round away" in n for n in p.notes)
    pure = plan(load_config(PAPER / model / f"{method}.toml", ["trainer.mixed_precision=false"]))
    assert pure.gib["weights"] == pytest.approx(p.params * 2 / GIB) and "generation_copy" not in pure.gib
    assert any("round away" in n for n in pure.notes)
    assert p.gib["logits_chunked_1024"] < p.gib["logits_unchunked"] / 20  # 1024 tokens of a pass of >= 8 x 3000
    assert p.gib["activations_ckpt"] < p.gib["activations_no_ckpt"] / 10
    assert p.seq_tokens <= p.max_positions


def test_dry_run_prefers_the_models_own_config_json(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1000,
                "tie_word_embeddings": True,
                "max_position_embeddings": 512,
            }
        )
    )
    res = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(PAPER / "qwen2.5-math-7b" / "daro.toml"),
            "--dry-run",
            "--set",
            f"model.path={tmp_path}",
            "--set",
            "rollout.max_new_tokens=100",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"from {tmp_path}/config.json" in res.output and "3 layers" in res.output
    res = runner.invoke(app, ["train", "--dry-run", "--set", f"model.path={tmp_path / 'nothing'}"])
    assert res.exit_code == 2 and "model.arch_file is empty" in res.output
    res = runner.invoke(app, ["train", "--dry-run", "--set", "model.arch_file=missing.json", "--set", "model.path=/x"])
    assert res.exit_code == 2 and "missing.json" in res.output
    res = runner.invoke(app, ["train", "--dry-run", "--resume", "abc"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["train", "--dry-run"])  # the tiny preset: builds, plans, trains nothing
    assert res.exit_code == 0 and "the tiny preset" in res.output


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_memory_plan_of_an_fsdp_job_shards_the_training_state(model, monkeypatch):
    """--gpus 8 with the configs' trainer.parallel = 'fsdp': per GPU, 1/8 of the fp32 master weights,
    gradients and AdamW states, a full bf16 generation copy, 1/8 of the generation batch, passes of
    micro_batch_prompts x K sequences; one GPU alone cannot hold the 7B/8B models' training state, 8 FSDP
    ranks can, and the whole update fits their 80 GB."""
    monkeypatch.chdir(PAPER.parents[1])
    cfg = load_config(PAPER / model / "daro.toml")
    assert cfg.trainer.parallel == "fsdp"
    one, eight = plan(cfg), plan(cfg, gpus=8)
    P = eight.params
    n = cfg.trainer.micro_batch_prompts
    assert n >= 1 and eight.fsdp and eight.gpus == 8 and eight.seqs == one.seqs == n * 8
    assert eight.gib["update_peak_as_configured"] < 80 and not any("one pass" in note for note in eight.notes)
    unsplit = plan(load_config(PAPER / model / "daro.toml", ["trainer.micro_batch_prompts=0"]), gpus=8)
    if unsplit.gib["update_peak_as_configured"] > 80:  # 7B, 8B: the plan says how to split
        assert any("set trainer.micro_batch_prompts" in note for note in unsplit.notes), unsplit.notes
    assert (
        unsplit.seqs == 64 // 8 * 8
        and unsplit.gib["update_peak_as_configured"] > eight.gib["update_peak_as_configured"]
    )
    assert eight.gib["weights"] == pytest.approx(P * 4 / 8 / GIB) and eight.gib["gradients"] == pytest.approx(
        P * 4 / 8 / GIB
    )
    assert eight.gib["adamw_states_fp32"] == pytest.approx(P * 8 / 8 / GIB)
    assert "generation_copy" not in eight.gib  # vLLM syncs from the shards; it holds its own copy
    assert cfg.rollout.engine == "vllm" and eight.gib["vllm_reserved"] == pytest.approx(0.3 * 80)  # colocated
    hf = [plan(load_config(PAPER / model / "daro.toml", ["rollout.engine=hf"]), gpus=g) for g in (1, 8)]
    assert (
        hf[1].gib["rollout_kv_cache"] == pytest.approx(hf[0].gib["rollout_kv_cache"] / 8)
        and "vllm_reserved" not in hf[1].gib
    )
    assert hf[1].gib["generation_copy"] == pytest.approx(P * 2 / GIB)  # the transformers engine's bf16 copy
    assert not any("round away" in n or "exceed one" in n for n in eight.notes)  # fp32 masters, sharded
    if P > 5e9:
        assert any("exceed one" in n for n in one.notes)
    res = runner.invoke(app, ["train", "--config", str(PAPER / model / "daro.toml"), "--dry-run", "--gpus", "8"])
    assert res.exit_code == 0 and "one GPU of 8 (FSDP)" in res.output and "fp32 master, 1/8 shard" in res.output, (
        res.output
    )
    ddp = plan(load_config(PAPER / model / "daro.toml", ["trainer.parallel=ddp"]), gpus=8)
    assert not ddp.fsdp and ddp.gib["weights"] == one.gib["weights"]


def test_experiment_files_cite_nothing_outside_the_clone():
    """A user's clone has only itself: configs cite the paper, docs/ or experiments/, never a path outside it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    up = re.compile(r"(^|[\s(`'\"])\.\./|\bshared/")  # a path that leaves the folder, or the workspace's shared/
    outside = [
        str(p.relative_to(root))
        for p in sorted((root / "experiments").rglob("*"))
        if p.is_file() and p.suffix in (".toml", ".md") and up.search(p.read_text())
    ]
    assert outside == []
