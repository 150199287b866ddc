"""The vectorised loss library against a naive loop over prompts and tokens (docs/math.md)."""

import math

import pytest
import torch

from daro_lab.algorithms import (
    METHODS,
    DaroWeights,
    LossSettings,
    MetricSums,
    PolicyBatch,
    Totals,
    batch_totals,
    compute_advantages,
    group_keys,
    loss_terms,
    policy_loss,
    static_shape,
)

DT = torch.float64


def random_batch(P, K, T, seed, p_extreme=0.25):
    """P prompts x K responses with ragged lengths (some empty), some prompts with mu in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    pr = torch.rand(P, generator=g)
    rewards = (torch.rand(P, K, generator=g) < pr[:, None]).to(DT)
    extreme = torch.rand(P, generator=g) < p_extreme
    rewards[extreme] = (torch.rand(int(extreme.sum()), 1, generator=g) < 0.5).to(DT).expand(-1, K)
    lengths = torch.randint(0, T + 1, (P * K,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DT)
    old = -torch.rand(P * K, T, generator=g, dtype=DT) * 3
    logp = old + 0.4 * torch.randn(P * K, T, generator=g, dtype=DT)  # ratios spread over both clips
    ref = old + 0.1 * torch.randn(P * K, T, generator=g, dtype=DT)
    return rewards, mask, logp, old, ref


def make_batch(method, rewards, mask, logp, old, ref=None, std="unbiased"):
    P, K = rewards.shape
    adv = compute_advantages(rewards, METHODS[method].advantage, std=std)
    return PolicyBatch(
        logp=logp,
        old_logp=old,
        mask=mask,
        advantages=adv.flatten(),
        num_correct=rewards.sum(1).long().repeat_interleave(K),
        rewards=rewards.flatten(),
        prompt_index=torch.arange(P).repeat_interleave(K),
        ref_logp=ref,
    )


def naive_loss(method, rewards, mask, logp, old, ref, s: LossSettings, w=None, eps=1e-6):
    """Loop over prompts, responses and tokens; nothing shared with the vectorised code."""
    P, K = rewards.shape
    T = mask.shape[1]
    r = rewards.tolist()
    kept = [p for p in range(P) if 0 < sum(r[p]) < K]
    adv_kind = METHODS[method].advantage
    if adv_kind == "batch_std":
        allr = [x for p in kept for x in r[p]]
        m = sum(allr) / len(allr)
        sd_b = math.sqrt(sum((x - m) ** 2 for x in allr) / (len(allr) - 1))
    A = {}
    for p in kept:
        mu = sum(r[p]) / K
        sd = math.sqrt(sum((x - mu) ** 2 for x in r[p]) / (K - 1))
        for i in range(K):
            if adv_kind == "group_std":
                A[p * K + i] = (r[p][i] - mu) / (sd + eps)
            elif adv_kind == "mean_only":
                A[p * K + i] = r[p][i] - mu
            else:
                A[p * K + i] = (r[p][i] - mu) / (sd_b + eps)

    def token_loss(b, t):
        a = A[b]
        rho = torch.exp(logp[b, t] - old[b, t])
        v = torch.maximum(-rho * a, -torch.clamp(rho, 1 - s.eps_low, 1 + s.eps_high) * a)
        if s.dual_clip is not None and a < 0:
            v = torch.minimum(v, torch.tensor(-s.dual_clip * a, dtype=DT))
        if s.kl_beta > 0:
            d = ref[b, t] - logp[b, t]
            v = v + s.kl_beta * (torch.exp(d) - d - 1) * (rho if s.kl_ratio else 1.0)
        return v

    resp = {}  # b -> list of token losses
    for p in kept:
        for i in range(K):
            b = p * K + i
            resp[b] = [token_loss(b, t) for t in range(T) if mask[b, t] > 0]
    zero = logp.sum() * 0
    nonempty = [b for b in resp if resp[b]]
    n_tok = sum(len(v) for v in resp.values())
    if not nonempty:
        return zero
    if method == "grpo":
        return sum(sum(resp[b]) / len(resp[b]) for b in nonempty) / len(nonempty)
    if method in ("dapo", "lipo"):
        return sum(sum(v) for v in resp.values()) / n_tok
    if method == "dr_grpo":
        return sum(sum(v) for v in resp.values()) / (len(nonempty) * s.max_response_length)
    # daro / static: sum_mu (w L_mu - C ln w), w detached for theta, signal routed into w
    total = zero
    for k in range(1, K):
        toks = [x for p in kept if sum(r[p]) == k for i in range(K) for x in resp[p * K + i]]
        if not toks:
            continue
        L = sum(toks) / len(toks)
        wk = w[k - 1]
        sig = naive_signal(
            s,
            L.item(),
            [
                (A[p * K + i], naive_factor(A[p * K + i], logp[p * K + i, t], old[p * K + i, t], s))
                for p in kept
                if sum(r[p]) == k
                for i in range(K)
                for t in range(T)
                if mask[p * K + i, t] > 0
            ],
        )
        wd = wk.detach()
        total = total + wd * L + (wk - wd) * sig - float(s.reg) * torch.log(wk)
    return total


def naive_factor(a, logp_t, old_t, s: LossSettings) -> float:
    """The clipped factor g of one token: l = -A g."""
    rho = math.exp(float((logp_t - old_t).detach()))
    if a > 0:
        return min(rho, 1 + s.eps_high)
    g = max(rho, 1 - s.eps_low)
    return min(g, s.dual_clip) if s.dual_clip is not None else g


def naive_signal(s: LossSettings, L: float, a_g: list[tuple[float, float]]) -> float:
    """What drives w, from L_mu and the group's tokens' (A, g)."""
    if s.weight_signal == "abs":
        return abs(L)
    if s.weight_signal == "signed":
        return L
    return sum(abs(a) * g for a, g in a_g) / len(a_g)  # mass


SETTINGS = [
    LossSettings(max_response_length=7),
    LossSettings(max_response_length=9, dual_clip=3.0, kl_beta=0.05, weight_signal="mass", reg=0.1),
    LossSettings(max_response_length=7, eps_low=0.1, eps_high=0.4, weight_signal="signed"),
    LossSettings(max_response_length=7, dual_clip=1.5, weight_signal="mass", reg=2.0),
    LossSettings(max_response_length=8, kl_beta=0.1, kl_ratio=True, reg=0.5),  # TRL's bias-corrected KL
]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("K", [2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_vectorised_matches_naive_loop(method, K, seed):
    s = SETTINGS[seed % len(SETTINGS)]
    rewards, mask, logp0, old, ref = random_batch(P=6, K=K, T=7, seed=seed * 100 + K)
    if not (0 < rewards.mean(1)).logical_and(rewards.mean(1) < 1).any():
        rewards[0, 0], rewards[0, 1] = 1.0, 0.0  # at least one interior prompt
    uses_w = METHODS[method].weights != "none"
    g = torch.Generator().manual_seed(seed)
    w_init = torch.exp(torch.randn(K - 1, generator=g, dtype=DT) * 0.5)

    logp_v = logp0.clone().requires_grad_()
    w_v = w_init.clone().requires_grad_() if uses_w else None
    loss_v, metrics = policy_loss(method, make_batch(method, rewards, mask, logp_v, old, ref), K, s, weights=w_v)
    loss_v.backward()

    logp_n = logp0.clone().requires_grad_()
    w_n = w_init.clone().requires_grad_() if uses_w else None
    loss_n = naive_loss(method, rewards, mask, logp_n, old, ref, s, w=w_n)
    loss_n.backward()

    assert loss_v.item() == pytest.approx(loss_n.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(logp_v.grad, logp_n.grad, atol=1e-6, rtol=1e-6)
    if method == "daro":
        torch.testing.assert_close(w_v.grad, w_n.grad, atol=1e-6, rtol=1e-6)
    if method == "static":
        assert w_v.grad is None or torch.all(w_v.grad == 0)
    # the sum of the group contributions C_mu is the loss, exactly
    assert sum(group_keys(metrics, "contrib").values()) == pytest.approx(loss_v.item(), abs=1e-9)


def test_bias_corrected_kl_changes_the_gradient_even_on_policy():
    """kl_ratio multiplies the KL by pi/pi_old: on-policy its value is 1, the loss unchanged, its gradient not
    (TRL's use_bias_correction_kl: d/dlogp of rho k3 = k3 + d k3/dlogp at rho = 1)."""
    rewards, mask, logp0, _, ref = random_batch(P=6, K=4, T=5, seed=3, p_extreme=0)
    grads, losses = [], []
    for kl_ratio in (False, True):
        logp = logp0.clone().requires_grad_()
        s = LossSettings(kl_beta=0.2, kl_ratio=kl_ratio)
        loss, _ = policy_loss("dapo", make_batch("dapo", rewards, mask, logp, logp0.clone(), ref), 4, s)
        loss.backward()
        grads.append(logp.grad.clone()), losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    d = ref - logp0
    k3 = (torch.exp(d) - d - 1) * mask
    n_tok = (mask * (rewards.sum(1).repeat_interleave(4)[:, None] % 4 > 0)).sum()
    kept = (rewards.sum(1) % 4 > 0).repeat_interleave(4)[:, None] * mask
    torch.testing.assert_close(grads[1] - grads[0], 0.2 * k3 * kept / n_tok, atol=1e-9, rtol=1e-7)


def test_daro_weight_gradient_is_signal_minus_inverse_weight():
    rewards, mask, logp, old, _ = random_batch(P=8, K=4, T=5, seed=7, p_extreme=0)
    w = torch.full((3,), 2.0, dtype=DT, requires_grad=True)
    loss, m = policy_loss("daro", make_batch("daro", rewards, mask, logp, old), 4, weights=w)
    loss.backward()
    L = group_keys(m, "loss")
    for k in range(1, 4):
        expected = abs(L[k]) - 0.5 if k in L else 0.0
        assert w.grad[k - 1].item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method", ["grpo", "dapo", "dr_grpo", "lipo"])
@pytest.mark.parametrize("K", [4, 8, 16])
def test_scale_matches_static_shapes(method, K):
    """Equal lengths, rho = 1, population std: S_mu per prompt equals the static shape of docs/math.md."""
    P, L, L_max = 2 * (K - 1), 5, 11
    rewards = torch.zeros(P, K, dtype=DT)
    for p in range(P):  # two prompts at every interior k
        rewards[p, : 1 + p % (K - 1)] = 1.0
    mask = torch.ones(P * K, L, dtype=DT)
    logp = torch.full((P * K, L), -1.0, dtype=DT)
    b = make_batch(method, rewards, mask, logp, logp.clone(), std="population")
    # eps = 0 in the advantage, so that the comparison is against the exact formula
    b.advantages = compute_advantages(rewards, METHODS[method].advantage, std="population", eps=0.0).flatten()
    _, m = policy_loss(method, b, K, LossSettings(max_response_length=L_max))
    sigma_b = rewards.flatten().std(correction=0).item()
    S, prompts = group_keys(m, "scale"), group_keys(m, "prompts")
    assert sorted(S) == list(range(1, K))
    for k, s_k in S.items():
        ref = static_shape(method, k / K, n_prompts=P, length_ratio=L / L_max, sigma_batch=sigma_b)
        assert s_k / prompts[k] == pytest.approx(ref, abs=1e-6, rel=1e-9)


def fixed_batch(K, L_target, T=4):
    """A batch whose per-group token-mean loss L_mu is fixed: rho = 1, chosen advantages."""
    ks = list(L_target)
    n = len(ks)
    adv = torch.tensor([-L_target[k] for k in ks], dtype=DT)  # at rho = 1, l = -A on every token
    return PolicyBatch(
        logp=torch.zeros(n, T, dtype=DT),
        old_logp=torch.zeros(n, T, dtype=DT),
        mask=torch.ones(n, T, dtype=DT),
        advantages=adv,
        num_correct=torch.tensor(ks),
        rewards=torch.ones(n, dtype=DT),
        prompt_index=torch.arange(n),
    )


@pytest.mark.parametrize("param,lr,steps", [("log", 0.05, 1500), ("direct", 0.05, 3000)])
def test_daro_weights_converge_to_inverse_loss(param, lr, steps):
    """L_mu held fixed and positive: AdamW (lr, steps as given) drives w_mu to 1/L_mu."""
    K = 4
    L_target = {1: 0.5, 2: 2.0, 3: 0.2}
    batch = fixed_batch(K, L_target)
    dw = DaroWeights(K, param=param, dtype=DT)
    opt = torch.optim.AdamW(dw.param_group(lr=lr)["params"], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss, m = policy_loss("daro", batch, K, weights=dw())
        loss.backward()
        dw.release_absent(m)
        opt.step()
        dw.project_()
    w = dw.as_dict()
    for k, L in L_target.items():
        assert w[k] == pytest.approx(1 / L, rel=1e-2)
        assert m[f"daro/wL/mu_{k}of{K}"] == pytest.approx(1.0, rel=2e-2)


@pytest.mark.parametrize("param", ["log", "direct"])
def test_signed_signal_with_nonpositive_loss_hits_bound(param):
    K = 4
    batch = fixed_batch(K, {1: -0.3, 2: 0.0, 3: 0.5})
    dw = DaroWeights(K, param=param, w_max=50.0, dtype=DT)
    opt = torch.optim.AdamW(dw.param_group(lr=0.5)["params"], lr=0.5, weight_decay=0.0)
    s = LossSettings(weight_signal="signed")
    for _ in range(400):
        opt.zero_grad()
        loss, m = policy_loss("daro", batch, K, s, weights=dw())
        loss.backward()
        opt.step()
        pm = dw.project_()
    w = dw.as_dict()
    assert w[1] == pytest.approx(50.0) and w[2] == pytest.approx(50.0)
    assert w[3] == pytest.approx(2.0, rel=5e-2)
    assert pm["daro/at_bound"] == 2.0
    assert m["daro/nonpositive_signal"] == 2.0
    assert math.isfinite(loss.item())


def test_absent_group_weight_is_not_stepped():
    K = 4
    dw = DaroWeights(K, dtype=DT)
    opt = torch.optim.AdamW(**{"params": dw.param_group(0.1)["params"]}, lr=0.1, weight_decay=0.0)
    batch = fixed_batch(K, {1: 0.5, 3: 0.5})  # k = 2 absent
    for _ in range(5):
        opt.zero_grad()
        loss, m = policy_loss("daro", batch, K, weights=dw())
        loss.backward()
        dw.release_absent(m)
        opt.step()
    w = dw.as_dict()
    assert w[2] == 1.0 and w[1] != 1.0 and w[3] != 1.0
    assert len(opt.state[dw.raw[1]]) == 0  # AdamW never touched it


def test_k_equal_one_is_a_clear_error():
    with pytest.raises(ValueError, match="K >= 2"):
        compute_advantages(torch.ones(3, 1), "group_std")
    with pytest.raises(ValueError, match="K >= 2"):
        DaroWeights(1)
    b = fixed_batch(2, {1: 0.5})
    with pytest.raises(ValueError, match="K >= 2"):
        policy_loss("dapo", b, 1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_all_padding_response_is_defined(method):
    rewards, mask, logp, old, _ = random_batch(P=3, K=4, T=5, seed=3, p_extreme=0)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0
    mask[1] = 0.0  # an all-padding response
    logp = logp.clone()
    logp[1] = float("nan")  # whatever sits in padding must not leak
    logp.requires_grad_()
    w = torch.ones(3, dtype=DT, requires_grad=True) if METHODS[method].weights != "none" else None
    loss, m = policy_loss(
        method, make_batch(method, rewards, mask, logp, old), 4, LossSettings(max_response_length=5), weights=w
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert m["batch/empty_responses"] == float((mask.sum(1) == 0).sum()) >= 1
    # every response empty: a zero loss, still differentiable, no NaN
    logp2 = old.clone().requires_grad_()
    loss2, m2 = policy_loss(
        method,
        make_batch(method, rewards, torch.zeros_like(mask), logp2, old),
        4,
        LossSettings(max_response_length=5),
        weights=w,
    )
    loss2.backward()
    assert loss2.item() == 0.0 and m2["batch/tokens"] == 0.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_prompt_solved_or_failed_gives_zero_loss_and_counts(method):
    K = 4
    rewards = torch.tensor([[1.0] * K, [0.0] * K, [1.0] * K], dtype=DT)
    mask = torch.ones(3 * K, 3, dtype=DT)
    logp = torch.full((3 * K, 3), -1.0, dtype=DT, requires_grad=True)
    w = torch.ones(K - 1, dtype=DT, requires_grad=True) if METHODS[method].weights != "none" else None
    loss, m = policy_loss(
        method,
        make_batch(method, rewards, mask, logp, logp.detach() - 0.1),
        K,
        LossSettings(max_response_length=3),
        weights=w,
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)
    assert m["batch/prompts"] == 3.0 and not m.keys() & {"batch/prompts_mu0", "batch/prompts_mu1"}
    assert group_keys(m, "loss") == {}


def test_nan_logprob_is_a_clear_error():
    rewards, mask, logp, old, _ = random_batch(P=2, K=4, T=3, seed=0, p_extreme=0)
    logp = logp.clone()
    logp[5, 0] = float("nan")
    mask[5, 0] = 1.0
    with pytest.raises(ValueError, match=r"non-finite logp at response 5, token 0"):
        policy_loss("dapo", make_batch("dapo", rewards, mask, logp, old), 4)


def test_per_group_lengths_and_clip_fractions_by_sign():
    K = 4
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DT)  # k = 1
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=DT)
    old = torch.zeros(4, 4, dtype=DT)
    logp = torch.zeros(4, 4, dtype=DT)
    logp[0, 0] = math.log(1.5)  # A > 0, rho 1.5 > 1.28: clipped
    logp[1, 0] = math.log(0.5)  # A < 0, rho 0.5 < 0.8: clipped
    logp[1, 1] = math.log(1.5)  # A < 0, rho 1.5: not clipped
    _, m = policy_loss("grpo", make_batch("grpo", rewards, mask, logp, old), K)
    assert m["len_correct/mu_1of4"] == 2.0
    assert m["len_incorrect/mu_1of4"] == pytest.approx((4 + 3 + 4) / 3)
    assert m["clipfrac_pos/mu_1of4"] == pytest.approx(1 / 2)
    assert m["clipfrac_neg/mu_1of4"] == pytest.approx(1 / 11)
    assert m["prompts/mu_1of4"] == 1.0 and m["tokens/mu_1of4"] == 13.0


def test_unknown_method_names_it():
    b = fixed_batch(4, {1: 0.5})
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        policy_loss("ppo", b, 4)


class ThreadReduce:
    """A Shard.reduce for ranks simulated by threads: every rank's tensor, summed or maxed."""

    def __init__(self, world: int):
        import threading

        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def for_rank(self, rank: int):
        def reduce(x, op="sum"):
            self.slots[rank] = x.detach().clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = stacked.sum(0) if op == "sum" else stacked.max(0).values
            self.barrier.wait()  # every rank has read before the next call overwrites
            return out

        return reduce


def _split_setup(method, seed):
    """A mini-batch of 5 prompts x 4 and a function that cuts any of its rows (None: a filler part, no tokens,
    prompt index -1, as a rank or pass without a prompt of the mini-batch) into a fresh PolicyBatch."""
    P, K, T = 5, 4, 6
    rewards, mask, logp, old, ref = random_batch(P, K, T, seed=seed)
    rewards[0] = torch.tensor([1.0, 0, 0, 1])  # at least one kept prompt
    full = make_batch(method, rewards, mask, logp, old, ref)  # advantages of the whole batch

    def part(rows):
        if rows is None:
            b = PolicyBatch(
                logp[:K].clone(),
                old[:K],
                torch.zeros(K, T, dtype=DT),
                torch.zeros(K, dtype=DT),
                torch.zeros(K, dtype=torch.long),
                torch.zeros(K, dtype=DT),
                torch.full((K,), -1),
                ref[:K],
            )
        else:
            b = PolicyBatch(
                logp[rows].clone(),
                old[rows],
                mask[rows],
                full.advantages[rows],
                full.num_correct[rows],
                full.rewards[rows],
                full.prompt_index[rows],
                ref[rows],
            )
        b.logp.requires_grad_(True)
        return b

    def rows_of(prompts):
        return torch.tensor([p * K + i for p in prompts for i in range(K)])

    return P, K, logp, part, rows_of


def _run(method, K, b, s, w0, totals=None):
    """loss_terms of one part with fresh weights; backward; (loss, d logp, d w, its LossTerms)."""
    w = w0.clone().requires_grad_(True) if METHODS[method].weights != "none" else None
    t = loss_terms(method, b, K, s, weights=w, totals=totals)
    t.loss.backward()
    return float(t.loss.detach()), b.logp.grad, None if w is None else w.grad, t


def _assert_metrics_equal(got, want):
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-10, abs=1e-12), key


S_SPLIT = LossSettings(kl_beta=0.05, max_response_length=0)
W0 = torch.tensor([0.5, 1.5, 2.0], dtype=DT)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("split", [[[0, 1], [2, 3, 4]], [[0, 3], [1], [2, 4], None]])
def test_parts_with_the_minibatch_totals_sum_to_the_whole(method, split):
    """A mini-batch cut into parts (accumulation's passes; the last one a filler): each part's loss with the
    whole mini-batch's totals (summed from the parts, passed as data) is its share: losses, gradients (log-probs
    and DARO weights) and, summed over the parts, metric sums add up to the one-part loss's."""
    P, K, logp, part, rows_of = _split_setup(method, seed=5)
    one_loss, one_grad, one_wgrad, one = _run(method, K, part(torch.arange(P * K)), S_SPLIT, W0)
    parts = [part(None if ps is None else rows_of(ps)) for ps in split]
    totals = Totals.combine([batch_totals(b, K, S_SPLIT) for b in parts])
    assert totals.parts == len(split)
    outs = [_run(method, K, b, S_SPLIT, W0, totals) for b in parts]
    assert sum(o[0] for o in outs) == pytest.approx(one_loss, rel=1e-12, abs=1e-12)
    grad = torch.zeros_like(one_grad)
    for ps, o in zip(split, outs):
        if ps is not None:
            grad[rows_of(ps)] += o[1]
        else:
            assert not o[1].any()  # filler rows get no gradient
    assert torch.allclose(grad, one_grad, rtol=1e-10, atol=1e-14)
    if one_wgrad is not None:
        assert torch.allclose(sum(o[2] for o in outs if o[2] is not None), one_wgrad, rtol=1e-12)
    _assert_metrics_equal(MetricSums.combine([o[3].stats for o in outs]).finish(), one.metrics)
    # a part alone is not the mini-batch: its own metrics differ
    assert outs[0][3].metrics["batch/responses"] < one.metrics["batch/responses"]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_and_passes_combine_to_the_whole_minibatch(method, world):
    """Data parallelism (ranks as threads) x accumulation (2 passes a rank): each rank combines its passes' totals
    and then the ranks' (Totals.combine with a Shard, the only collectives); every rank then gets the one-process
    metrics, and the losses and gradients of all parts add up to the one-process ones. The last rank holds only
    filler rows."""
    from concurrent.futures import ThreadPoolExecutor

    from daro_lab.algorithms import Shard

    P, K, logp, part, rows_of = _split_setup(method, seed=11)
    one_loss, one_grad, one_wgrad, one = _run(method, K, part(torch.arange(P * K)), S_SPLIT, W0)
    mine = [list(range(P))[r :: world - 1] for r in range(world - 1)] + [None]
    red = ThreadReduce(world)

    def rank(r):
        shard = Shard(world, red.for_rank(r))
        ps = mine[r]
        passes = [part(None)] if ps is None else [part(rows_of(ps[:1])), part(rows_of(ps[1:]) if ps[1:] else None)]
        totals = Totals.combine([batch_totals(b, K, S_SPLIT) for b in passes], shard)
        outs = [_run(method, K, b, S_SPLIT, W0, totals) for b in passes]
        return passes, outs, MetricSums.combine([o[3].stats for o in outs], shard).finish(), totals.parts

    with ThreadPoolExecutor(world) as ex:
        results = list(ex.map(rank, range(world)))
    assert sum(o[0] for _, outs, _, _ in results for o in outs) == pytest.approx(one_loss, rel=1e-12, abs=1e-12)
    grad = torch.zeros_like(one_grad)
    for passes, outs, metrics, parts in results:
        assert parts == sum(len(r[0]) for r in results)  # every pass of every rank
        _assert_metrics_equal(metrics, one.metrics)
        for b, o in zip(passes, outs):
            real = b.prompt_index >= 0
            if real.any():
                grad[b.prompt_index[real].unique()[:, None] * K + torch.arange(K)] += o[1].view(-1, K, o[1].shape[1])
    assert torch.allclose(grad, one_grad, rtol=1e-10, atol=1e-14)
    if one_wgrad is not None:
        wg = sum(o[2] for _, outs, _, _ in results for o in outs if o[2] is not None)
        assert torch.allclose(wg, one_wgrad, rtol=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_totals_counted_without_logprobs(method):
    """Methods without weights need only the counts, which the masks give (no forward pass); a method with
    weights whose signal reads L_mu refuses them, naming why."""
    P, K, logp, part, rows_of = _split_setup(method, seed=3)
    parts = [part(rows_of([0, 1])), part(rows_of([2, 3, 4]))]
    counted = Totals.combine([batch_totals(b, K, S_SPLIT, with_loss=False) for b in parts])
    summed = Totals.combine([batch_totals(b, K, S_SPLIT) for b in parts])
    assert not counted.with_loss and summed.with_loss
    assert torch.equal(counted.tokens, summed.tokens) and counted.width == summed.width
    if METHODS[method].weights != "none":
        with pytest.raises(ValueError, match="its totals must be summed from log-probs"):
            loss_terms(method, parts[0], K, S_SPLIT, weights=W0, totals=counted)
        return
    a = loss_terms(method, parts[0], K, S_SPLIT, totals=counted)
    b = loss_terms(method, parts[0], K, S_SPLIT, totals=summed)
    assert float(a.loss) == float(b.loss)
    with pytest.raises(ValueError, match="totals are of K = 4, the loss's K is 5"):
        loss_terms(method, parts[0], 5, S_SPLIT, totals=counted)


def test_offset_is_recorded_apart_from_the_coefficient_part():
    """C_mu = w L_mu + offset on DARO's path; the offset -C ln w carries no theta-gradient."""
    rewards, mask, logp, old, _ = random_batch(P=8, K=4, T=5, seed=11, p_extreme=0)
    w = torch.tensor([0.5, 2.0, 3.0], dtype=DT, requires_grad=True)
    s = LossSettings(reg=0.3)
    loss, m = policy_loss("daro", make_batch("daro", rewards, mask, logp, old), 4, s, weights=w)
    C, off, L = group_keys(m, "contrib"), group_keys(m, "contrib_offset"), group_keys(m, "loss")
    assert set(off) == set(C) == set(L) and off
    for k in off:
        assert off[k] == pytest.approx(-0.3 * math.log(w[k - 1].item()), abs=1e-12)
        assert C[k] - off[k] == pytest.approx(w[k - 1].item() * L[k], abs=1e-12)
    assert "contrib_offset/mu_1of4" not in policy_loss("dapo", make_batch("dapo", rewards, mask, logp, old), 4)[1]


def naive_running(signals: list[dict[int, float]], beta: float, decay: float = 0.99):
    """Bias-corrected EMAs over updates, by a plain loop: per group (present ones only) and of the mean
    |signal| over the present groups (reg = 'auto'). Returns [(signal {k: s}, C)] per update."""
    m, n, rm, rn, out = {}, {}, 0.0, 0, []
    for sig in signals:
        eff = {}
        for k, v in sig.items():
            m[k] = beta * m.get(k, 0.0) + (1 - beta) * v
            n[k] = n.get(k, 0) + 1
            eff[k] = m[k] / (1 - beta ** n[k])
        rm, rn = decay * rm + (1 - decay) * sum(abs(v) for v in eff.values()) / len(eff), rn + 1
        out.append((eff, rm / (1 - decay**rn)))
    return out


@pytest.mark.parametrize("signal", ["abs", "mass"])
def test_signal_ema_and_auto_reg_follow_a_naive_running_mean(signal):
    """Four updates with different groups present: the w-gradient is (EMA of the signal) - C/w, with C the
    running mean of the present groups' mean signal, and the state travels through DaroWeights."""
    K, beta = 6, 0.7
    s = LossSettings(weight_signal=signal, signal_ema=beta, reg="auto")
    dw = DaroWeights(K, dtype=DT)
    raw_signals, grads, Cs = [], [], []
    for step in range(4):
        rewards, mask, logp, old, _ = random_batch(P=4, K=K, T=6, seed=300 + step, p_extreme=0)
        b = make_batch("daro", rewards, mask, logp, old)
        t = loss_terms("daro", b, K, s, weights=dw(), daro_state=dw.state())
        dw.zero_grad()
        t.loss.backward()
        # the raw signal of this mini-batch alone, from a fresh state without EMA
        fresh = loss_terms("daro", b, K, LossSettings(weight_signal=signal), weights=dw().detach())
        raw_signals.append({k: v for k, v in group_keys(fresh.metrics, "daro/signal").items()})
        grads.append({k: float(dw.raw[k - 1].grad) for k in raw_signals[-1]})
        Cs.append(t.metrics["daro/reg"])
        dw.set_state(t.daro_state)
    w = dw.as_dict()  # never stepped: the weights stay 1, so d/ds (w = e^s) = d/dw
    for (eff, C), g, c_logged in zip(naive_running(raw_signals, beta), grads, Cs):
        assert c_logged == pytest.approx(C, rel=1e-9)
        for k, v in eff.items():
            assert g[k] == pytest.approx((v - C / w[k]) * w[k], rel=1e-9, abs=1e-12)
    assert len({frozenset(x) for x in raw_signals}) > 1, "the test needs updates with different groups present"


@pytest.mark.parametrize("reg", [0.25, "auto"])
def test_mass_signal_weights_reach_their_fixed_point(reg):
    """Held-fixed batch: AdamW drives w_mu to C / mass_mu, so w_mu * mass_mu / C -> 1 (daro/wS)."""
    K = 4
    rewards, mask, logp, old, _ = random_batch(P=12, K=K, T=6, seed=5, p_extreme=0)
    b = make_batch("daro", rewards, mask, logp, old)
    s = LossSettings(weight_signal="mass", reg=reg)
    dw = DaroWeights(K, dtype=DT)
    opt = torch.optim.AdamW(dw.param_group(lr=0.05)["params"], lr=0.05, weight_decay=0.0)
    for _ in range(1500):
        opt.zero_grad()
        t = loss_terms("daro", b, K, s, weights=dw(), daro_state=dw.state())
        t.loss.backward()
        dw.release_absent(t.metrics)
        opt.step()
        dw.project_()
        dw.set_state(t.daro_state)
    ws = group_keys(t.metrics, "daro/wS")
    assert len(ws) >= 2
    for k, v in ws.items():
        assert v == pytest.approx(1.0, abs=2e-2)
    mass = group_keys(t.metrics, "mass")
    C = t.metrics["daro/reg"]
    for k in ws:
        assert dw.as_dict()[k] == pytest.approx(C / mass[k], rel=2e-2)
    if reg == "auto":  # C is the mean mass over the groups, so the weights' geometric centre is near 1
        assert C == pytest.approx(sum(mass[k] for k in ws) / len(ws), rel=1e-6)


def test_every_loss_setting_is_declared_once_and_read_by_the_trainer_trl_and_simulator(tmp_path):
    """Each LossSettings field names its config key and its TRL attribute; a config (and a simulator config)
    with every named value changed gives settings with exactly those values, so a new setting needs no mapping."""
    import dataclasses

    from daro_lab.config import describe, load_config
    from daro_lab.simulate import SimConfig

    fields = dataclasses.fields(LossSettings)
    keys = {k for k, _, _ in describe()}
    assert all(f.metadata["config"] in keys and f.metadata["trl"] for f in fields)
    changed = {  # a value other than the default for every setting, as the config writes it
        "algo.eps_low": ("0.15", 0.15),
        "algo.eps_high": ("0.35", 0.35),
        "algo.dual_clip": ("3.0", 3.0),
        "algo.kl_beta": ("0.05", 0.05),
        "algo.kl_ratio": ("true", True),
        "rollout.max_new_tokens": ("11", 11),
        "algo.daro.signal": ("mass", "mass"),
        "algo.daro.reg": ("'auto'", "auto"),
        "algo.daro.signal_ema": ("0.5", 0.5),
    }
    assert set(changed) == {f.metadata["config"] for f in fields}  # a new field: add it here
    cfg = load_config(None, [f"{k}={text}" for k, (text, _) in changed.items()])
    got = LossSettings.from_config(cfg)
    assert all(getattr(got, f.name) == changed[f.metadata["config"]][1] for f in fields)
    assert all(getattr(LossSettings.from_config(load_config()), f.name) != getattr(got, f.name) for f in fields)
    sim = SimConfig(eps_low=0.1, eps_high=0.3, max_len=9)
    s = LossSettings.read("sim", lambda name: getattr(sim, name))
    assert (s.eps_low, s.eps_high, s.max_response_length, s.weight_signal) == (0.1, 0.3, 9, "abs")
