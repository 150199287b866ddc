"""The one mini-batch update unit (daro_lab/trainer/update.py): passes add up to the one-pass update, and the
groups' gradient geometry is what a naive loop over the gradients gives."""

import math

import pytest
import torch

from daro_lab.algorithms import DaroWeights, LossSettings, Shard, compute_advantages, kept_prompts
from daro_lab.record import mu_key
from daro_lab.testbed import SyntheticPolicy, TestbedConfig
from daro_lab.testbed.loop import TestbedRuntime
from daro_lab.testbed.model import RIGHT
from daro_lab.trainer.update import backward_minibatch, group_geometry

K = 8


def test_group_geometry_is_the_naive_loop_on_random_gradients():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5):
        V = torch.randn(n, 40, generator=gen, dtype=torch.float64) + 0.3  # some alignment
        ks = list(range(2, 2 + n))
        m = group_geometry(V @ V.T, ks, K)
        for i, kk in enumerate(ks):
            assert m[f"gradnorm/{mu_key(kk, K)}"] == pytest.approx(float(V[i].norm()), rel=1e-12)
            if n > 1:
                rest = V.sum(0) - V[i]
                cos = float(V[i] @ rest / (V[i].norm() * rest.norm()))
                assert m[f"gradcos/{mu_key(kk, K)}"] == pytest.approx(cos, rel=1e-10)
        if n > 1:
            pairs = [float(V[i] @ V[j] / (V[i].norm() * V[j].norm())) for i in range(n) for j in range(i + 1, n)]
            assert m["grad/cos_mean"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-10)
        else:
            assert "grad/cos_mean" not in m and not any(k.startswith("gradcos/") for k in m)


def _parts(cfg: TestbedConfig, seed: int = 0):
    policy = SyntheticPolicy(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randperm(len(policy.level), generator=gen)[: cfg.prompts_per_step]
    with torch.no_grad():
        answers = torch.multinomial(torch.softmax(policy(prompts), -1), K, replacement=True, generator=gen)
    rewards = RIGHT[answers].float()
    keep = kept_prompts(rewards)
    return policy, prompts[keep], answers[keep], rewards[keep]


@pytest.mark.parametrize(
    "method, signal", [("grpo", "mass"), ("dapo", "mass"), ("daro", "mass"), ("daro", "grad"), ("static", "mass")]
)
def test_passes_add_up_to_the_one_pass_update_with_its_metrics(method, signal):
    """The mini-batch split into 3 passes: the same gradients, loss metrics, G_mu and cosines as one pass."""
    cfg = TestbedConfig(prompts=48, prompts_per_step=24, sharing=0.5)
    out = []
    for n_passes in (1, 3):
        policy, idx, answers, rewards = _parts(cfg)
        adv = compute_advantages(rewards, "group_std")
        weights = DaroWeights(K) if method in ("daro", "static") else None
        # the optimizer holds every parameter the update reaches: measuring G_mu over 3 passes runs backwards
        # whose gradients it must clear (the trainer's holds the policy and DARO's weights)
        opt = torch.optim.SGD([*policy.parameters(), *([] if weights is None else weights.parameters())], lr=0.1)
        chunks = torch.arange(len(idx)).tensor_split(n_passes)
        parts = [(idx[c], answers[c], rewards[c], adv[c]) for c in chunks]
        r = backward_minibatch(
            method,
            parts,
            K,
            LossSettings(weight_signal=signal, reg="auto"),
            Shard(),
            TestbedRuntime(policy, opt),
            weights,
            measure_groups=True,
        )
        out.append(
            (
                r,
                torch.cat([p.grad.flatten() for p in policy.parameters()]),
                None if method != "daro" else torch.stack([p.grad for p in weights.raw]),
            )
        )
    (r1, g1, w1), (r3, g3, w3) = out
    assert torch.allclose(g1, g3, rtol=1e-5, atol=1e-9)
    if method == "daro":
        assert torch.allclose(w1, w3, rtol=1e-5, atol=1e-9)  # the weights' gradient too
    assert r1.metrics.keys() == r3.metrics.keys()
    assert any(k.startswith("gradcos/") for k in r1.metrics) and "grad/cos_mean" in r1.metrics
    for key, v in r1.metrics.items():
        assert r3.metrics[key] == pytest.approx(v, rel=1e-4, abs=1e-7), key
    assert r3.batch.logp.shape[0] == r1.batch.logp.shape[0] == len(r1.batch.advantages)


def test_orthogonal_groups_have_cosine_zero_and_shared_parameters_align_them():
    cos = {}
    for sharing in (0.0, 1.0):
        policy, idx, answers, rewards = _parts(TestbedConfig(prompts=64, prompts_per_step=32, sharing=sharing))
        adv = compute_advantages(rewards, "group_std")
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        r = backward_minibatch(
            "grpo",
            [(idx, answers, rewards, adv)],
            K,
            LossSettings(),
            Shard(),
            TestbedRuntime(policy, opt),
            measure_groups=True,
        )
        cos[sharing] = [v for k, v in r.metrics.items() if k.startswith("gradcos/")]
        assert len(cos[sharing]) >= 3
    assert max(abs(c) for c in cos[0.0]) < 1e-12  # disjoint parameters per prompt, so per group
    assert min(cos[1.0]) > 0.3 and math.isfinite(sum(cos[1.0]))


def test_norms_alone_when_cosines_are_off():
    policy, idx, answers, rewards = _parts(TestbedConfig(prompts=64, prompts_per_step=32, sharing=1.0))
    adv = compute_advantages(rewards, "group_std")
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    args = ("grpo", [(idx, answers, rewards, adv)], K, LossSettings(), Shard(), TestbedRuntime(policy, opt))
    on = backward_minibatch(*args, measure_groups=True).metrics
    off = backward_minibatch(*args, measure_groups=True, cosines=False).metrics
    assert not any(k.startswith("gradcos/") for k in off) and "grad/cos_mean" not in off
    for k, v in off.items():
        assert on[k] == pytest.approx(v, rel=1e-6), k
