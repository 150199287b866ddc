"""Mixed precision (trainer/precision.py): fp32 master weights and AdamW states, compute in model.dtype."""

from __future__ import annotations

import torch
from _dist_check import batches  # fixed scored batches from the starting policy


def _trainer(small_env, *extra):
    from daro_lab.config import load_config
    from daro_lab.trainer.loop import Trainer

    return Trainer(
        load_config(
            None,
            [*small_env, "model.dtype=bfloat16", "algo.method=daro", "trainer.lr=1e-6", "trainer.grad_clip=0", *extra],
        )
    )


def _moved(t, before) -> int:
    return sum(int((p.detach().float() != b).sum()) for p, b in zip(t.model.parameters(), before))


def test_bf16_policy_trains_on_fp32_masters_and_generates_from_a_bf16_copy(small_env):
    """model.dtype=bfloat16 (what 'auto' gives on GPU), the paper's lr 1e-6: with mixed precision the fp32
    masters move and the bf16 generation copy equals them rounded after every update; without it the bf16
    parameters stay where they were (the steps round away), the failure mixed precision exists for."""
    t = _trainer(small_env)
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    assert {p.dtype for p in t.generation_model.parameters()} == {torch.bfloat16}
    assert t.engine.model is t.generation_model  # the engine samples from the copy
    before = [p.detach().float().clone() for p in t.model.parameters()]
    for step, (roll, rewards) in enumerate(batches(t, 2), start=1):
        mbs, _, _ = t.update(step, roll, rewards)
        assert mbs
        for p, q in zip(t.model.parameters(), t.generation_model.parameters()):
            assert torch.equal(p.detach().to(torch.bfloat16), q)
    mixed_moved = _moved(t, before)
    n = sum(p.numel() for p in t.model.parameters())
    assert mixed_moved > 0.5 * n

    pure = _trainer(small_env, "trainer.mixed_precision=false")
    assert {p.dtype for p in pure.model.parameters()} == {torch.bfloat16} and pure.generation_model is pure.model
    before = [p.detach().float().clone() for p in pure.model.parameters()]
    for step, (roll, rewards) in enumerate(batches(pure, 2), start=1):
        pure.update(step, roll, rewards)
    assert _moved(pure, before) < 0.1 * mixed_moved


def test_mixed_precision_checkpoints_hold_the_fp32_masters(small_env, tmp_path):
    t = _trainer(small_env)
    ((roll, rewards),) = batches(t, 1)
    t.update(1, roll, rewards)
    t.save(tmp_path / "ck")
    resumed = _trainer(small_env)
    resumed.load(tmp_path / "ck")
    for p, q in zip(t.model.parameters(), resumed.model.parameters()):
        assert q.dtype == torch.float32 and torch.equal(p, q)
    for p, q in zip(resumed.model.parameters(), resumed.generation_model.parameters()):
        assert torch.equal(p.detach().to(torch.bfloat16), q)  # the copy is refreshed on load
