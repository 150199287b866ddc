"""The five methods of the paper (and `static`) as one registry, with per-pass-rate accounting.

A method is one function: given the mini-batch grouped by pass rate, it returns the per-token
coefficient c [B, T] of its aggregation and, for DARO, a per-group offset. `policy_loss` does the
rest, identically for every method:

    l = clipped surrogate (+ beta * k3 KL)                      [B, T]
    loss = sum_{b,t} c_{b,t} l_{b,t} + sum_mu offset_mu
    C_mu = the part of that sum over the group's tokens and offset   (sum_mu C_mu = loss, exactly)
    S_mu = sum over the group's tokens of c |A|                       (the loss scale)
    L_mu = token-mean of l over the group's tokens

Groups are keyed by the integer k = number of correct responses of the prompt (mu = k/K), never by
a binned float. Responses of prompts with k = 0 or k = K are counted, then dropped from the update.
Pure: tensors in, (loss, metrics) out; no logging, no globals beyond the registry.

Data parallelism: with a `Shard`, each rank passes its part of the mini-batch; every normaliser
(tokens per group, responses, L_mu) is summed over ranks, so the rank's loss is its exact share of
the whole mini-batch's loss (the shares sum to it) and every metric is the whole mini-batch's.
Rows with prompt_index -1 are filler (a rank with no prompt of this mini-batch): no tokens, no count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from daro_lab.algorithms.aggregation import constant_normaliser, seq_mean_token_mean, token_mean
from daro_lab.record import group_values, mu_key, parse_group_key  # noqa: F401 - the vocabulary, re-exported
from daro_lab.algorithms.surrogate import clipped_surrogate, kl_k3


@dataclass(frozen=True)
class LossSettings:
    """The numbers the loss needs, a view of `AlgoConfig` and `RolloutConfig`."""

    eps_low: float = 0.2  # lower clip range
    eps_high: float = 0.28  # upper clip range (clip-higher)
    dual_clip: float | None = None  # dual-clip constant c > 1, or None
    kl_beta: float = 0.0  # coefficient of the k3 KL term
    max_response_length: int = 0  # Dr. GRPO's constant normaliser L_max (0: the batch's T)
    weight_signal: str = "abs"  # DARO: what drives w: 'abs', 'signed', 'grad' or 'mass' (see SIGNALS)
    reg: float | str = 1.0  # DARO: the regulariser's constant C in sum (w L - C ln w); 'auto': running mean signal
    signal_ema: float = 0.0  # DARO: decay of the per-group EMA of the signal across updates (0: this mini-batch's)


# What drives DARO's weights (the w-gradient is signal_mu - C / w_mu, fixed point w_mu = C / signal_mu).
SIGNALS = {
    "abs": "|L_mu|, the token-mean loss's magnitude",
    "signed": "L_mu itself (paper-literal; no finite fixed point when L_mu <= 0)",
    "grad": "||grad_theta L_mu||, the size of the group's update",
    "mass": "token-mean of |A| g over the group: its loss mass before advantages of opposite sign cancel",
}
REG_EMA = 0.99  # decay of the running mean behind reg = 'auto' (bias-corrected: a plain mean for early updates)


class DaroState(NamedTuple):
    """What the signal reading carries from one update to the next (DaroWeights keeps it as buffers).

    Both averages are bias-corrected EMAs (Adam-style): value = m / (1 - decay ** n).
    """

    signal_m: Tensor  # [K+1] EMA accumulator of each group's signal
    signal_n: Tensor  # [K+1] updates in which the group was present
    reg_m: Tensor  # [] EMA accumulator of the mean |signal| over present groups (reg = 'auto')
    reg_n: Tensor  # [] updates seen

    @staticmethod
    def fresh(K: int, device=None) -> "DaroState":
        z = torch.zeros(K + 1, dtype=torch.float64, device=device)
        return DaroState(z, z.clone(), z.new_zeros(()), z.new_zeros(()))


def read_signal(raw: Tensor, present: Tensor, s: LossSettings, state: DaroState | None) -> tuple[Tensor, Tensor, DaroState]:
    """The signal that drives the weights and the regulariser's constant, from this mini-batch's raw
    signal [K+1] and the running state: (signal [K+1], C [], the state after this update). Pure."""
    K = raw.shape[0] - 1
    state = state if state is not None else DaroState.fresh(K, raw.device)
    raw64 = raw.detach().double()
    beta = float(s.signal_ema)
    m = torch.where(present, beta * state.signal_m + (1 - beta) * raw64, state.signal_m)
    n = state.signal_n + present.double()
    signal = torch.where(present, m / (1 - beta ** n).clamp(min=1e-12), raw64)
    if s.reg == "auto":
        if present.any():
            c_now = signal[present].abs().mean()
            reg_m, reg_n = REG_EMA * state.reg_m + (1 - REG_EMA) * c_now, state.reg_n + 1
        else:
            reg_m, reg_n = state.reg_m, state.reg_n
        C = reg_m / (1 - REG_EMA ** reg_n) if reg_n > 0 else raw64.new_ones(())
    else:
        C = raw64.new_tensor(float(s.reg))
        reg_m, reg_n = state.reg_m, state.reg_n
    return signal.to(raw.dtype), C.to(raw.dtype), DaroState(m, n, reg_m, reg_n)


def _no_reduce(x: Tensor, op: str = "sum") -> Tensor:
    return x


@dataclass(frozen=True)
class Shard:
    """Where this process's rows sit in a data-parallel mini-batch (one process: the default).

    `reduce(x, op)` returns x ('sum' or 'max') combined over the ranks, detached; every rank must
    call `policy_loss` for every mini-batch, since the reductions are collective.
    """

    world_size: int = 1
    reduce: Callable[[Tensor, str], Tensor] = _no_reduce


@dataclass
class PolicyBatch:
    """One mini-batch of B responses, T padded response tokens. Rows of one prompt share `prompt_index`."""

    logp: Tensor  # [B, T] log pi_theta of each response token (differentiable)
    old_logp: Tensor  # [B, T] log pi_old, the sampling policy's log-probs
    mask: Tensor  # [B, T] 1 on response tokens, 0 on padding (read as per-token weights: a token of weight n counts n times)
    advantages: Tensor  # [B] one advantage per response (computed per step, before the split)
    num_correct: Tensor  # [B] long, k of the response's prompt, in 0..K
    rewards: Tensor  # [B] the response's reward in {0, 1}
    prompt_index: Tensor  # [B] long, which prompt the response answers (-1: filler row, see Shard)
    ref_logp: Tensor | None = None  # [B, T] reference log-probs, needed when kl_beta > 0


@dataclass
class GroupView:
    """What a method sees: the kept tokens and the per-group token-mean losses.

    Counts are the whole mini-batch's (summed over data-parallel ranks); `mask` and `group_loss`
    are this rank's rows and share.
    """

    K: int
    k: Tensor  # [B] long
    mask: Tensor  # [B, T] float, kept tokens only
    n_responses: Tensor  # [] kept responses with at least one token
    group_loss: Tensor  # [K+1] L_mu (this rank's share), differentiable; 0 for absent groups
    present: Tensor  # [K+1] bool: interior groups with tokens in this mini-batch
    weights: Tensor | None  # [K-1] DARO weights for k = 1..K-1
    signal: Tensor | None  # [K+1] what drives the DARO weights, detached
    reg: Tensor | None = None  # [] DARO's regulariser constant C (None: 1)
    tokens: Tensor | None = None  # [K+1] kept tokens per group (None: counted in `mask`)
    n_tokens: Tensor | None = None  # [] kept tokens (None: counted in `mask`)
    width: int = 0  # padded response length of the mini-batch (0: mask.shape[1])
    world_size: int = 1  # data-parallel ranks; a per-group offset is split evenly over them


class Scaling(NamedTuple):
    coef: Tensor  # [B, T] the aggregation coefficient c
    offset: Tensor | None = None  # [K+1] a per-group additive term (DARO's -C ln w): no theta-gradient


MethodFn = Callable[[GroupView, LossSettings], Scaling]


ShapeFn = Callable[..., "float | Tensor"]  # shape(mu, n_prompts, length_ratio, token_share, sigma_batch)


@dataclass(frozen=True)
class Method:
    """Everything about a method, in one place: the registry entry `register_method` makes."""

    name: str
    fn: MethodFn  # (GroupView, LossSettings) -> Scaling: its aggregation coefficient (and offset)
    advantage: str  # key of ADVANTAGES
    weights: str  # 'none', 'learned' (DARO) or 'frozen' (static)
    doc: str  # first line of the function's docstring
    label: str  # display name in figures and reports
    paper: str  # where the method comes from
    shape: ShapeFn | None = None  # S_mu per prompt at equal lengths and population std (static_shape)
    token_sum: bool = False  # its per-prompt loss scale sums tokens, so lengths change it (length_corrected_shape)

    @property
    def daro_path(self) -> bool:
        """Weighs the pass-rate groups with weights w_mu (learned or frozen)."""
        return self.weights != "none"


METHODS: dict[str, Method] = {}


def register_method(name: str, advantage: str, weights: str = "none", label: str | None = None, paper: str = "",
                    shape: ShapeFn | None = None, token_sum: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Add a method to the registry: `@register_method("mine", advantage="group_std", label="Mine")`.

    shape(mu, n_prompts, length_ratio, token_share, sigma_batch): its static shape, if it has one;
    token_sum: its aggregation sums over tokens (per prompt, longer answers weigh more)."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, advantage, weights, (fn.__doc__ or "").strip().splitlines()[0],
                               label or name, paper, shape, token_sum)
        return fn

    return deco


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def _shape_grpo(mu, n, length_ratio, share, sigma_batch):
    return 2 * _sqrt(mu * (1 - mu)) / n


def _shape_dapo(mu, n, length_ratio, share, sigma_batch):
    return 2 * _sqrt(mu * (1 - mu)) * share


def _shape_dr_grpo(mu, n, length_ratio, share, sigma_batch):
    return 2 * mu * (1 - mu) * length_ratio / n


def _shape_lipo(mu, n, length_ratio, share, sigma_batch):
    if sigma_batch is None:
        raise ValueError("lipo's static shape needs sigma_batch")
    return 2 * mu * (1 - mu) / sigma_batch * share


# ---------------------------------------------------------------------------------------------
# The methods


@register_method("grpo", advantage="group_std", label="GRPO", paper="arXiv 2402.03300", shape=_shape_grpo)
def grpo(g: GroupView, s: LossSettings) -> Scaling:
    """GRPO (arXiv 2402.03300): group-std advantage, mean over responses of per-response token-means."""
    return Scaling(seq_mean_token_mean(g.mask, g.n_responses))


@register_method("dapo", advantage="group_std", label="DAPO", paper="arXiv 2503.14476", shape=_shape_dapo,
                 token_sum=True)
def dapo(g: GroupView, s: LossSettings) -> Scaling:
    """DAPO (arXiv 2503.14476): group-std advantage, token-mean over the mini-batch."""
    return Scaling(token_mean(g.mask, g.n_tokens))


@register_method("dr_grpo", advantage="mean_only", label="Dr. GRPO", paper="arXiv 2503.20783", shape=_shape_dr_grpo,
                 token_sum=True)
def dr_grpo(g: GroupView, s: LossSettings) -> Scaling:
    """Dr. GRPO (arXiv 2503.20783): r - mu advantage, sum / (responses * max response length)."""
    L_max = s.max_response_length or g.width or g.mask.shape[1]
    return Scaling(constant_normaliser(g.mask, L_max, g.n_responses))


@register_method("lipo", advantage="batch_std", label="LIPO", paper="Lite PPO, arXiv 2508.08221", shape=_shape_lipo,
                 token_sum=True)
def lipo(g: GroupView, s: LossSettings) -> Scaling:
    """LIPO as Lite PPO (arXiv 2508.08221): group mean, batch std, token-mean."""
    return Scaling(token_mean(g.mask, g.n_tokens))


def _weighted_groups(g: GroupView, w: Tensor) -> Scaling:
    """sum_mu (w_mu L_mu - C ln w_mu) over the present groups (C = 1: the paper's regulariser).

    theta sees sum_mu sg(w_mu) grad L_mu; w sees signal_mu - C/w_mu (fixed point w_mu = C/signal_mu).
    The offset (w - sg(w)) sg(signal) - C ln w is worth -C ln w and routes the signal into w's gradient.
    """
    K = g.K
    ones = w.new_ones(1)
    w_full = torch.cat([ones, w, ones])  # [K+1], index by k
    tokens = g.tokens
    if tokens is None:
        tokens = torch.zeros(K + 1, dtype=g.mask.dtype, device=g.mask.device).index_add_(0, g.k, g.mask.sum(1))
    coef = g.mask * (w_full.detach() / tokens.clamp(min=1))[g.k][:, None]  # [B, T]
    signal = g.signal if g.signal is not None else g.group_loss.detach().abs()
    C = g.reg if g.reg is not None else w.new_ones(())
    offset = ((w_full - w_full.detach()) * signal - C * torch.log(w_full)) / g.world_size  # each rank's share
    return Scaling(coef, torch.where(g.present, offset, torch.zeros_like(offset)))


@register_method("daro", advantage="group_std", weights="learned", label="DARO", paper="arXiv 2510.09001")
def daro(g: GroupView, s: LossSettings) -> Scaling:
    """DARO (arXiv 2510.09001): sum over pass-rate groups of w_mu L_mu - C ln w_mu, w learned."""
    if g.weights is None:
        raise ValueError("method 'daro' needs weights: pass weights=DaroWeights(K)()")
    return _weighted_groups(g, g.weights)


@register_method("static", advantage="group_std", weights="frozen", label="DARO, frozen w",
                 paper="DARO's path with frozen weights (docs/math.md, section 4)")
def static(g: GroupView, s: LossSettings) -> Scaling:
    """Static ablation: DARO's code path with the weights frozen (no gradient reaches them)."""
    if g.weights is None:
        raise ValueError("method 'static' needs weights: pass the frozen weights [K-1]")
    return _weighted_groups(g, g.weights.detach())


# ---------------------------------------------------------------------------------------------
# The shared path


def _validate(b: PolicyBatch, K: int) -> None:
    if K < 2:
        raise ValueError(f"K = {K} responses per prompt: a pass rate strictly between 0 and 1 needs K >= 2")
    B, T = b.logp.shape
    for name in ("old_logp", "mask"):
        if getattr(b, name).shape != (B, T):
            raise ValueError(f"{name} has shape {tuple(getattr(b, name).shape)}, logp has {(B, T)}")
    for name in ("advantages", "num_correct", "rewards", "prompt_index"):
        if getattr(b, name).shape != (B,):
            raise ValueError(f"{name} must have shape [{B}], got {tuple(getattr(b, name).shape)}")
    if B and (b.num_correct.min() < 0 or b.num_correct.max() > K):
        raise ValueError(f"num_correct must lie in 0..{K}, got {b.num_correct.min()}..{b.num_correct.max()}")
    on = b.mask.bool()
    for name in ("logp", "old_logp"):
        t = getattr(b, name)
        bad = on & ~torch.isfinite(t.detach())
        if bad.any():
            i, j = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"non-finite {name} at response {i}, token {j}: {t[i, j].item()}")
    if not torch.isfinite(b.advantages).all():
        i = torch.nonzero(~torch.isfinite(b.advantages))[0].item()
        raise ValueError(f"non-finite advantage at response {i}")


class LossTerms(NamedTuple):
    """Everything `loss_terms` computes on one mini-batch (per-group tensors indexed by k = 0..K)."""

    loss: Tensor  # [] this rank's share of the mini-batch's loss, differentiable
    metrics: dict[str, float]  # the whole mini-batch's metrics (docs/math.md keys), identical on every rank
    contrib: Tensor  # [K+1] C_mu, this rank's share, differentiable; sums to `loss`
    group_loss: Tensor  # [K+1] L_mu, this rank's share, differentiable
    present: Tensor  # [K+1] bool: interior groups with tokens in the mini-batch
    factor: Tensor  # [B, T] g, the clipped factor of l = -A g, detached
    daro_state: DaroState | None  # the signal state after this update (methods with weights)


def policy_loss(
    method: str,
    batch: PolicyBatch,
    K: int,
    settings: LossSettings = LossSettings(),
    weights: Tensor | None = None,
    group_grad_norms: Tensor | None = None,
    return_groups: bool = False,
    shard: Shard = Shard(),
    daro_state: DaroState | None = None,
):
    """Loss and per-pass-rate metrics of `method` on one mini-batch (the drop-in API; see `loss_terms`).

    Returns (loss [] scalar, metrics dict[str, float]), or (loss, metrics, (C [K+1], L [K+1])) with
    return_groups.
    """
    t = loss_terms(method, batch, K, settings, weights, group_grad_norms, shard, daro_state)
    if return_groups:
        return t.loss, t.metrics, (t.contrib, t.group_loss)
    return t.loss, t.metrics


def loss_terms(
    method: str,
    batch: PolicyBatch,
    K: int,
    settings: LossSettings = LossSettings(),
    weights: Tensor | None = None,
    group_grad_norms: Tensor | None = None,
    shard: Shard = Shard(),
    daro_state: DaroState | None = None,
) -> LossTerms:
    """Loss, per-pass-rate metrics and per-group terms of `method` on one mini-batch.

    Args:
        method: a key of METHODS.
        batch: the mini-batch, B responses x T tokens (see PolicyBatch).
        K: responses per prompt; groups are k = 0..K.
        settings: clip ranges, KL, Dr. GRPO's L_max, DARO's signal, regulariser and signal EMA.
        weights: [K-1] DARO weights for k = 1..K-1 ('daro': differentiable; 'static': frozen).
        group_grad_norms: [K-1] ||grad_theta L_mu||, the DARO signal when settings.weight_signal='grad'.
        shard: data parallelism: `batch` is this rank's part of the mini-batch (see Shard).
        daro_state: the signal state before this update (`DaroWeights.state()`); None: a fresh one. Only
            settings.signal_ema > 0 and reg = 'auto' read it.

    Under a Shard, loss, C and L are this rank's shares (they sum over ranks to the whole mini-batch's)
    and the metrics are the whole mini-batch's, identical on every rank.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    _validate(batch, K)
    spec = METHODS[method]
    k = batch.num_correct.long()
    B, T = batch.logp.shape
    dt = batch.logp.dtype
    interior = (k > 0) & (k < K)  # [B]
    mask = batch.mask.to(dt) * interior[:, None].to(dt)  # [B, T] kept tokens
    lengths = mask.sum(1)  # [B]

    # padding may hold anything (even NaN): zero it before exp(), so no NaN reaches a gradient
    on = batch.mask.bool()
    logp = torch.where(on, batch.logp, torch.zeros_like(batch.logp))
    old_logp = torch.where(on, batch.old_logp.to(dt), torch.zeros_like(logp))
    adv = batch.advantages.to(dt)
    sur = clipped_surrogate(logp, old_logp, adv, settings.eps_low, settings.eps_high, settings.dual_clip)
    l = sur.loss  # [B, T] = -A g
    if settings.kl_beta > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_beta > 0 needs batch.ref_logp")
        kl = kl_k3(logp, torch.where(on, batch.ref_logp.to(dt), torch.zeros_like(logp)))
        l = l + settings.kl_beta * kl
    l = torch.where(mask.bool(), l, torch.zeros_like(l))  # no NaN from padding can leak
    g = sur.factor.detach()

    def per_group(x: Tensor) -> Tensor:  # [B] -> [K+1], sum within each k
        return torch.zeros(K + 1, dtype=x.dtype, device=x.device).index_add(0, k, x)

    # the whole mini-batch's counts: one collective for the sums, one for the padded width
    local_l = per_group((l * mask).sum(1))  # [K+1] sum of l over each group's tokens (mask as weights), differentiable
    local_mass = per_group((adv.abs()[:, None] * g * mask).sum(1))  # [K+1] sum of |A| g over each group's tokens
    n_resp = (lengths > 0).sum().to(dt)
    sums = shard.reduce(torch.cat([per_group(lengths), local_l.detach(), local_mass.detach(), n_resp[None]]), "sum")
    tokens, l_sum, mass_sum, n_resp = sums[: K + 1], sums[K + 1 : 2 * K + 2], sums[2 * K + 2 : 3 * K + 3], sums[-1]
    width = T if shard.world_size == 1 else int(shard.reduce(torch.tensor(float(T), device=l.device), "max"))
    group_loss = local_l / tokens.clamp(min=1)  # [K+1] L_mu (this rank's share)
    arange = torch.arange(K + 1, device=k.device)
    present = (tokens > 0) & (arange > 0) & (arange < K)
    L_global = l_sum / tokens.clamp(min=1)  # [K+1] L_mu of the whole mini-batch, detached
    mass = mass_sum / tokens.clamp(min=1)  # [K+1] token-mean |A| g of the whole mini-batch's group

    signal = reg = new_state = None
    if spec.weights != "none":
        if weights is None or weights.shape != (K - 1,):
            raise ValueError(f"method {method!r} needs weights of shape [{K - 1}], got "
                             f"{None if weights is None else tuple(weights.shape)}")
        weights = weights.to(dt)
        if settings.weight_signal == "abs":
            raw = L_global.abs()
        elif settings.weight_signal == "signed":
            raw = L_global
        elif settings.weight_signal == "mass":
            raw = mass
        elif settings.weight_signal == "grad":
            if group_grad_norms is None or group_grad_norms.shape != (K - 1,):
                raise ValueError("weight_signal='grad' needs group_grad_norms of shape [K-1]")
            z = group_grad_norms.new_zeros(1)
            raw = torch.cat([z, group_grad_norms.detach(), z]).to(dt)
        else:
            raise ValueError(f"unknown weight_signal {settings.weight_signal!r}: one of {', '.join(SIGNALS)}")
        signal, reg, new_state = read_signal(raw, present, settings, daro_state)

    view = GroupView(K, k, mask, n_resp, group_loss, present, weights, signal, reg, tokens, tokens.sum(), width,
                     shard.world_size)
    scaling = spec.fn(view, settings)
    contrib = per_group((scaling.coef * l).sum(1))  # [K+1] C_mu without offsets
    offset = scaling.offset
    if offset is not None:
        contrib = contrib + offset
    if B == 0 or not present.any():
        loss = l.sum() * 0.0  # defined, zero, and still attached to the graph
    else:
        loss = contrib.sum()

    metrics = _metrics(K, k, batch, mask, lengths, scaling, sur, L_global, mass, tokens, contrib, present, loss,
                       weights, signal, reg, shard)
    return LossTerms(loss, metrics, contrib, group_loss, present, g, new_state)


@torch.no_grad()
def _metrics(K, k, batch, mask, lengths, scaling, sur, L_global, mass, tokens, contrib, present, loss, weights,
             signal, reg, shard):
    """Per-group and batch metrics, as plain floats keyed by the record's vocabulary (daro_lab.record).

    Every count and sum is taken over this rank's rows, then all of them are summed over the ranks
    in one collective, so the metrics are the whole mini-batch's.
    """
    def per_group(x: Tensor) -> Tensor:
        return torch.zeros(K + 1, dtype=x.dtype, device=x.device).index_add(0, k, x)

    dt = torch.float64
    mask = mask.to(dt)
    valid = (batch.prompt_index >= 0).to(dt)  # [B] 0 on filler rows
    adv = batch.advantages.to(dt)
    correct = (batch.rewards > 0.5).to(dt) * valid
    incorrect = (1 - correct) * valid
    raw_len = batch.mask.to(dt).sum(1)  # lengths before dropping mu in {0, 1}
    pos = (adv > 0)[:, None].to(dt) * mask
    neg = (adv < 0)[:, None].to(dt) * mask
    clipped = sur.clipped.to(dt)
    ratio = sur.ratio.detach().to(dt)
    # prompts per k: one k per prompt index (filler rows, index -1, count for nothing)
    real = batch.prompt_index >= 0
    uniq, inv = torch.unique(batch.prompt_index[real], return_inverse=True)
    k_of_prompt = torch.zeros(len(uniq), dtype=torch.long, device=k.device).scatter_(0, inv, k[real])
    prompts = torch.bincount(k_of_prompt, minlength=K + 1).to(dt)

    group_sums = {  # name -> [K+1]
        "scale": per_group((scaling.coef.detach().to(dt) * adv.abs()[:, None]).sum(1)),  # S_mu
        "contrib": contrib.detach().to(dt), "prompts": prompts,
        "offset": (scaling.offset.detach().to(dt) if scaling.offset is not None
                   else torch.zeros(K + 1, dtype=dt, device=k.device)),
        "n_corr": per_group(correct), "n_inc": per_group(incorrect),
        "len_corr": per_group(raw_len * correct), "len_inc": per_group(raw_len * incorrect),
        "clip_pos": per_group((clipped * pos).sum(1)), "pos": per_group(pos.sum(1)),
        "clip_neg": per_group((clipped * neg).sum(1)), "neg": per_group(neg.sum(1)),
    }
    scalar_sums = {
        "loss": loss.detach().to(dt), "responses": (lengths > 0).sum().to(dt), "empty": ((raw_len == 0).to(dt) * valid).sum(),
        "clip_pos": (clipped * pos).sum(), "pos": pos.sum(), "clip_neg": (clipped * neg).sum(), "neg": neg.sum(),
        "clip_all": (clipped * mask).sum(), "ratio": (ratio * mask).sum(),
    }
    flat = shard.reduce(torch.cat([torch.stack(list(group_sums.values())).flatten(),
                                   torch.stack(list(scalar_sums.values()))]), "sum").tolist()
    G = len(group_sums) * (K + 1)
    g = {name: flat[i * (K + 1) : (i + 1) * (K + 1)] for i, name in enumerate(group_sums)}
    t = dict(zip(scalar_sums, flat[G:]))
    on = batch.mask.bool()
    ratio_max = shard.reduce(ratio[on].max() if on.any() else ratio.new_tensor(-math.inf), "max").item()

    def div(a: float, b: float) -> float:
        return a / max(b, 1.0)

    cols = {
        "loss": L_global.double().tolist(), "contrib": g["contrib"], "scale": g["scale"], "prompts": g["prompts"],
        "tokens": tokens.double().tolist(), "mass": mass.double().tolist(),
        "len_correct": [div(a, b) for a, b in zip(g["len_corr"], g["n_corr"])],
        "len_incorrect": [div(a, b) for a, b in zip(g["len_inc"], g["n_inc"])],
        "clipfrac_pos": [div(a, b) for a, b in zip(g["clip_pos"], g["pos"])],
        "clipfrac_neg": [div(a, b) for a, b in zip(g["clip_neg"], g["neg"])],
    }
    if scaling.offset is not None:
        cols["contrib_offset"] = g["offset"]  # DARO's -C ln w_mu: part of C_mu, without a theta-gradient
    if weights is not None:
        w_full = torch.cat([weights.new_ones(1), weights.detach(), weights.new_ones(1)]).double()
        cols["daro/weight"] = w_full.tolist()  # the weights this loss used
        cols["daro/wL"] = (w_full * L_global.double()).tolist()
        cols["daro/signal"] = signal.double().tolist()
        cols["daro/wS"] = (w_full * signal.double() / float(reg)).tolist()  # 1 at the fixed point w = C / signal
    out: dict[str, float] = {}
    for kk in torch.nonzero(present).flatten().tolist():
        key = mu_key(kk, K)
        for name, v in cols.items():
            out[f"{name}/{key}"] = v[kk]
    n_tok = sum(cols["tokens"][1:K])
    out.update({
        "loss/total": t["loss"],
        "batch/responses": t["responses"],
        "batch/tokens": n_tok,
        "batch/empty_responses": t["empty"],
        "batch/prompts": sum(g["prompts"]),
        "batch/prompts_mu0": g["prompts"][0],  # a caller that passes every prompt (TRL) sees them here
        "batch/prompts_mu1": g["prompts"][K],
        "clipfrac/pos": div(t["clip_pos"], t["pos"]),
        "clipfrac/neg": div(t["clip_neg"], t["neg"]),
        "clipfrac/all": div(t["clip_all"], n_tok),
        "ratio/max": ratio_max if math.isfinite(ratio_max) else 1.0,
        "ratio/mean": div(t["ratio"], n_tok),
    })
    if weights is not None and signal is not None:
        # with the signed signal, L_mu <= 0 has no finite fixed point: the weight runs to its bound
        out["daro/nonpositive_signal"] = float(((signal <= 0) & present).sum())
        out["daro/reg"] = float(reg)
    return out


def group_keys(metrics: dict[str, float], name: str) -> dict[int, float]:
    """{k: value} of one per-group quantity, e.g. group_keys(m, 'loss') -> {3: L_3of8, ...} (record.group_values)."""
    return group_values(metrics, name)


def static_shape(method: str, mu: float | Tensor, n_prompts: int, length_ratio: float = 1.0,
                 token_share: float | None = None, sigma_batch: float | None = None):
    """Reference loss scale S_mu per prompt at equal lengths and population std (docs/math.md), from the
    method's registry entry.

    grpo 2 sqrt(mu(1-mu)) / N; dapo 2 sqrt(mu(1-mu)) * token_share; dr_grpo 2 mu(1-mu) L/L_max / N;
    lipo 2 mu(1-mu) / sigma_batch * token_share. token_share = prompt tokens / batch tokens (1/N at
    equal lengths); length_ratio = L / L_max.
    """
    shaped = shaped_methods()
    if method not in shaped:
        raise ValueError(f"no static shape for method {method!r}; defined for {', '.join(shaped)}")
    share = 1.0 / n_prompts if token_share is None else token_share
    return METHODS[method].shape(mu, n_prompts, length_ratio, share, sigma_batch)


def shaped_methods() -> list[str]:
    """The methods with a static shape (the baselines), in registry order."""
    return [m for m, spec in METHODS.items() if spec.shape is not None]


def length_corrected_shape(method: str, k: int, K: int, len_correct: float, len_incorrect: float,
                           std: str = "unbiased", eps: float = 1e-6) -> float:
    """S_mu per prompt of a baseline up to a factor common to the mini-batch, from the mean lengths of the
    group's right and wrong answers: (k A+ L+ + (K-k) |A-| L-) for the token-summing methods (`token_sum`:
    dapo, lipo, dr_grpo), k A+ + (K-k) |A-| for grpo (its per-response token-mean removes the lengths).

    A+ and A- are the method's advantages of a right and a wrong answer at mu = k/K (lipo's batch std
    is left out: common to the mini-batch). At equal lengths and population std this is the static shape
    (`static_shape`) up to that factor; unequal lengths are what moves the token-summing methods off it.
    """
    if method not in shaped_methods():
        raise ValueError(f"no length-corrected shape for method {method!r}; defined for {', '.join(shaped_methods())}")
    mu = k / K
    if METHODS[method].advantage == "group_std":
        var = mu * (1 - mu) * (K / (K - 1) if std == "unbiased" else 1.0)
        a_pos, a_neg = (1 - mu) / (math.sqrt(var) + eps), mu / (math.sqrt(var) + eps)
    else:  # mean_only (dr_grpo), batch_std (lipo): r - mu, over a std common to the mini-batch
        a_pos, a_neg = 1 - mu, mu
    if not METHODS[method].token_sum:  # a per-response token-mean: the lengths cancel
        return k * a_pos + (K - k) * a_neg
    return k * a_pos * len_correct + (K - k) * a_neg * len_incorrect
