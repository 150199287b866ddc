"""Warm start of the tiny preset: the teacher-forcing batch, the answer-only loss, the disk cache,
determinism, held-out eval prompts, and (slow) that pass rates really spread over (0, 1)."""

import collections
import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from daro_lab.config import ModelConfig
from daro_lab.models import CharTokenizer, build_tiny_model, load_policy, warm_start
from daro_lab.models import warmstart as ws
from daro_lab.tasks import Problem, TaskConfig, build_task
from daro_lab.tasks.arithmetic import reward_batch

TASK = TaskConfig(num_train=200, num_eval=50)


def tiny_cfg(tmp_path, **kw) -> ModelConfig:
    base = ModelConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        warmstart_steps=5,
        warmstart_batch=8,
        cache_dir=str(tmp_path / "cache"),
    )
    return dataclasses.replace(base, **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_make_batch_layout():
    tok = CharTokenizer()
    ids, mask = ws.make_batch([Problem("1+2=", "3", 1), Problem("10+5=", "15", 2)], tok)
    # <s> 1 + 2 = 3 </s> <pad> / <s> 1 0 + 5 = 1 5 </s>
    assert ids.tolist() == [[1, 4, 13, 5, 16, 6, 2, 0, 0], [1, 4, 3, 13, 8, 16, 4, 8, 2]]
    # targets are ids[:, 1:]; only answer digits and eos count
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]


def test_answer_loss_is_mean_nll_of_answer_and_eos_tokens():
    tok = CharTokenizer()
    model = build_tiny_model(tiny_cfg(Path(".")), 18, 0)
    problems = [Problem("1+2=", "3", 1), Problem("10+5=", "15", 2)]
    ids, mask = ws.make_batch(problems, tok)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits, -1)
        manual = []
        for b, p in enumerate(problems):
            start = 1 + len(p.prompt)  # index of the first answer token in ids
            for t in range(start, start + len(p.answer) + 1):  # answer digits, then eos
                manual.append(-logp[b, t - 1, ids[b, t]].item())
        loss = ws.answer_loss(model, ids, mask).item()
    assert loss == pytest.approx(sum(manual) / len(manual), rel=1e-5)


def test_cache_key_depends_on_what_changes_the_model(tmp_path):
    cfg = tiny_cfg(tmp_path)
    key = ws.cache_key(cfg, TASK, 0)
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)
    assert ws.cache_key(dataclasses.replace(cfg, cache_dir="elsewhere"), TASK, 0) == key
    assert ws.cache_key(cfg, TASK, 1) != key
    assert ws.cache_key(dataclasses.replace(cfg, warmstart_steps=6), TASK, 0) != key
    assert ws.cache_key(dataclasses.replace(cfg, hidden_size=16), TASK, 0) != key
    assert ws.cache_key(cfg, dataclasses.replace(TASK, max_digits=4), 0) != key
    assert ws.cache_path(cfg, TASK, 0) == tmp_path / "cache" / key


def test_second_call_loads_from_cache_with_identical_weights(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    model1, tok1 = warm_start(cfg, TASK, seed=0)
    path = ws.cache_path(cfg, TASK, 0)
    for f in ("config.json", "model.safetensors", "char_vocab.json", "tokenizer_config.json", ws.INFO_FILE):
        assert (path / f).is_file(), f
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary dirs left behind
    info = ws.warm_start_info(cfg, TASK, 0)
    assert info["steps"] == 5 and info["key"] == path.name and math.isfinite(info["final_loss"])

    def no_training(*a, **k):
        raise AssertionError("second call trained instead of loading")

    monkeypatch.setattr(ws, "train", no_training)
    model2, tok2 = warm_start(cfg, TASK, seed=0)
    assert same_weights(model1, model2)
    assert type(tok2) is CharTokenizer and tok2.encode_prompts(["1+2="]) == tok1.encode_prompts(["1+2="])
    # and through load_policy (empty path -> the cached tiny preset)
    model3, tok3 = load_policy(cfg, 0, TASK)
    assert same_weights(model1, model3) and type(tok3) is CharTokenizer


def test_training_is_deterministic_and_matches_the_cache(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cached, _ = warm_start(cfg, TASK, seed=0)
    fresh, _, _ = ws.train(cfg, TASK, seed=0)
    other, _, _ = ws.train(cfg, TASK, seed=1)
    assert same_weights(cached, fresh)
    assert not same_weights(cached, other)
    assert not same_weights(cached, build_tiny_model(cfg, 18, 0))  # training changed the weights


def test_warm_start_never_trains_on_eval_prompts(tmp_path, monkeypatch):
    # a 1-digit task has only 100 prompts, so eval (25, the most it may hold) would be hit often if not excluded
    task = TaskConfig(min_digits=1, max_digits=1, num_train=50, num_eval=25)
    eval_prompts = {p.prompt for p in build_task(task)[1]}
    seen = []
    real = ws.make_batch

    def spy(problems, tok, targets=None):
        seen.extend(p.prompt for p in problems)
        return real(problems, tok, targets)

    monkeypatch.setattr(ws, "make_batch", spy)
    ws.train(tiny_cfg(tmp_path, warmstart_steps=10, warmstart_batch=32), task, seed=0)
    assert len(seen) == 320 and not set(seen) & eval_prompts


def test_warm_start_lowers_the_answer_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, warmstart_steps=60, warmstart_batch=32, warmstart_lr=3e-3)
    problems = build_task(TASK)[1]
    ids, mask = ws.make_batch(problems, CharTokenizer())
    with torch.no_grad():
        before = ws.answer_loss(build_tiny_model(cfg, 18, 0), ids, mask).item()
        model, _, info = ws.train(cfg, TASK, seed=0)  # trains even under no_grad
        after = ws.answer_loss(model, ids, mask).item()
    assert before > 2.5  # about log(18): uniform over the vocabulary
    assert after < before - 0.8, (before, after)


def test_other_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="arithmetic"):
        warm_start(tiny_cfg(tmp_path), dataclasses.replace(TASK, name="gsm8k"), seed=0)


# -- slow: the recommended warm start gives a spread of pass rates -------------------------------


@torch.no_grad()
def sample_pass_rates(model, tok, problems, k=8, max_new_tokens=8, temperature=1.0, seed=0):
    """Plain ancestral sampling, no KV cache, prompts of equal length batched together.

    Returns mu, the fraction of K samples the verifier accepts, one per problem.
    """
    g = torch.Generator().manual_seed(seed)
    by_len = collections.defaultdict(list)
    for i, p in enumerate(problems):
        by_len[len(p.prompt)].append(i)
    mu = [0.0] * len(problems)
    for idx in by_len.values():
        ids = torch.tensor(tok.encode_prompts([problems[i].prompt for i in idx])).repeat_interleave(k, 0)  # (n*K, P)
        P = ids.shape[1]
        for _ in range(max_new_tokens):
            probs = (model(input_ids=ids).logits[:, -1].float() / temperature).softmax(-1)  # (n*K, V)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
        r = reward_batch(tok.decode_responses(ids[:, P:]), [problems[i].answer for i in idx for _ in range(k)])
        for j, i in enumerate(idx):
            mu[i] = sum(r[j * k : (j + 1) * k]) / k
    return mu


@pytest.mark.slow
def test_recommended_warm_start_spreads_pass_rates(tmp_path):
    # the recommended defaults (warmstart_steps 1200, lr 1e-3; other fields as in ModelConfig);
    # measured over seeds 0-2: 70-81% of 64 eval prompts with 0 < mu < 1 at K=8, ~22 s on 2 cores
    cfg = ModelConfig(warmstart_steps=1200, warmstart_lr=1e-3, cache_dir=str(tmp_path))
    task = TaskConfig()
    model, tok = warm_start(cfg, task, seed=0)
    problems = build_task(task)[1][:64]
    mu = sample_pass_rates(model, tok, problems)
    interior = sum(0 < m < 1 for m in mu) / len(mu)
    acc = collections.defaultdict(list)
    for p, m in zip(problems, mu):
        acc[p.level].append(m)
    acc = {lv: sum(v) / len(v) for lv, v in acc.items()}
    assert interior >= 0.4, (interior, acc)
    assert sum(m == 0 for m in mu) / len(mu) < 0.6 and sum(m == 1 for m in mu) / len(mu) < 0.3
    assert acc[2] > acc[3], acc  # more digits, harder (one-digit prompts are ~2% of the set)
    assert acc.get(1, 1.0) >= acc[3], acc


def test_bf16_preset_trains_in_fp32_and_loads_in_bf16(tmp_path):
    cfg = tiny_cfg(tmp_path, dtype="bfloat16")
    assert ws.train(cfg, TASK, seed=0)[0].dtype == torch.float32
    model, _ = warm_start(cfg, TASK, seed=0)
    assert model.dtype == torch.bfloat16


def test_a_held_out_set_that_would_leave_too_few_prompts_to_train_on_is_refused(tmp_path):
    # 1-digit arithmetic has 100 prompts: a held-out set of all of them would leave the warm start nothing
    task = TaskConfig(min_digits=1, max_digits=1, num_train=0, num_eval=100)
    with pytest.raises(ValueError, match=r"at most 25 .* lower task.num_eval"):
        ws.train(tiny_cfg(tmp_path), task, seed=0)


def test_warm_start_is_the_same_at_any_thread_count_of_its_caller(tmp_path):
    """The warm start trains at WARMSTART_THREADS whatever its caller runs at (a trainer's trainer.threads may depend on
    the load), and gives the caller its count back. Without the fixed count, 1 and 2 threads differ (checked)."""
    if (torch.get_num_threads() < 2 and (os.cpu_count() or 1) < 2) or ws.WARMSTART_THREADS != 1:
        pytest.skip("needs 2 cores to compare two thread counts")
    # the preset's width and batch (at the test preset's, one and two threads split no sum differently)
    cfg = ModelConfig(warmstart_steps=40, cache_dir=str(tmp_path / "cache"))
    before = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = ws.train(cfg, TASK, seed=0)[0]
            assert torch.get_num_threads() == n
        assert same_weights(got[1], got[2])
        torch.set_num_threads(2)
        if same_weights(got[1], ws._train(cfg, TASK, seed=0)[0]):  # the training loop itself at 2 threads
            pytest.skip("these kernels give the same weights at 1 and 2 threads: the fixed count is not tested here")
    finally:
        torch.set_num_threads(before)
