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

A mini-batch split into parts (gradient accumulation's passes, data-parallel ranks): the whole mini-batch's
normalisers (tokens per group, responses, the padded width, L_mu and the loss mass for DARO's signal) are
summed by the caller (`Totals.combine`, over its passes and then over the ranks of a `Shard`) and passed to
each part's loss as data (`totals=`), so each part's loss is its exact share of the whole mini-batch's (the
shares sum to it); the parts' metric sums add up the same way (`MetricSums.combine`) into the whole
mini-batch's metrics. The loss itself calls no collective. Rows with prompt_index -1 are filler (a rank with
no prompt of this mini-batch): no tokens, no count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from daro_lab.algorithms.aggregation import constant_normaliser, seq_mean_token_mean, token_mean
from daro_lab.algorithms.surrogate import clipped_surrogate, kl_k3
from daro_lab.record import LOSS_TOTAL, group_values, mu_key


def _setting(default: Any, config: str, trl: str, sim: str = "") -> Any:
    """A loss setting, declared once with where each caller reads it: `config`, its key in daro_lab.config;
    `trl`, the GRPOTrainer attribute ('args.x': of its GRPOConfig) that daro_lab.integrations.trl reads;
    `sim`, its option in the simulator's SimConfig ('' where the simulator has none: the default, or per reading)."""
    return dataclasses.field(default=default, metadata={"config": config, "trl": trl, "sim": sim})


@dataclass(frozen=True)
class LossSettings:
    """The numbers the loss needs. A new one is a field here (with its config key and its TRL attribute) plus
    its config field: the trainer, the TRL integration and the simulator read it through `read`."""

    eps_low: float = _setting(0.2, "algo.eps_low", "epsilon_low", "eps_low")  # lower clip range
    eps_high: float = _setting(0.28, "algo.eps_high", "epsilon_high", "eps_high")  # upper clip range (clip-higher)
    dual_clip: float | None = _setting(None, "algo.dual_clip", "args.delta")  # dual-clip constant c > 1, or None
    kl_beta: float = _setting(0.0, "algo.kl_beta", "beta")  # coefficient of the k3 KL term
    # the per-token KL times the importance ratio pi/pi_old, differentiable: the unbiased reverse-KL gradient
    # (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default in TRL 1.16); nothing without kl_beta
    kl_ratio: bool = _setting(False, "algo.kl_ratio", "args.use_bias_correction_kl")
    # Dr. GRPO's constant normaliser L_max (0: the batch's T)
    max_response_length: int = _setting(0, "rollout.max_new_tokens", "max_completion_length", "max_len")
    # DARO: what drives w: 'abs', 'signed', 'grad' or 'mass' (see SIGNALS)
    weight_signal: str = _setting("abs", "algo.daro.signal", "args.daro_signal")
    # DARO: the regulariser's constant C in sum (w L - C ln w); 'auto': running mean signal
    reg: float | str = _setting(1.0, "algo.daro.reg", "args.daro_reg")
    # DARO: decay of the per-group EMA of the signal across updates (0: this mini-batch's)
    signal_ema: float = _setting(0.0, "algo.daro.signal_ema", "args.daro_signal_ema")

    def __post_init__(self):
        if isinstance(self.reg, str) and self.reg.strip() != "auto":  # TRL's daro_reg is text: '1', '0.5'
            object.__setattr__(self, "reg", float(self.reg))
        if self.max_response_length is None:
            object.__setattr__(self, "max_response_length", 0)

    @classmethod
    def read(cls, source: str, get: Callable[[str], Any], **over: Any) -> LossSettings:
        """The settings a caller holds: get(name) for every field's name in `source` ('config', 'trl' or
        'sim'; see `_setting`), the defaults for fields it does not name, then `over`."""
        values = {f.name: get(f.metadata[source]) for f in dataclasses.fields(cls) if f.metadata[source]}
        return cls(**{**values, **over})

    @classmethod
    def from_config(cls, cfg: Any) -> LossSettings:
        """The settings of a daro_lab.config.Config (the trainer's)."""

        def get(key: str) -> Any:
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            return obj

        return cls.read("config", get)


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


def read_signal(
    raw: Tensor, present: Tensor, s: LossSettings, state: DaroState | None
) -> tuple[Tensor, Tensor, DaroState]:
    """The signal that drives the weights and the regulariser's constant, from this mini-batch's raw
    signal [K+1] and the running state: (signal [K+1], C [], the state after this update). Pure."""
    K = raw.shape[0] - 1
    state = state if state is not None else DaroState.fresh(K, raw.device)
    raw64 = raw.detach().double()
    beta = float(s.signal_ema)
    m = torch.where(present, beta * state.signal_m + (1 - beta) * raw64, state.signal_m)
    n = state.signal_n + present.double()
    signal = torch.where(present, m / (1 - beta**n).clamp(min=1e-12), raw64)
    if s.reg == "auto":
        if present.any():
            c_now = signal[present].abs().mean()
            reg_m, reg_n = REG_EMA * state.reg_m + (1 - REG_EMA) * c_now, state.reg_n + 1
        else:
            reg_m, reg_n = state.reg_m, state.reg_n
        C = reg_m / (1 - REG_EMA**reg_n) if reg_n > 0 else raw64.new_ones(())
    else:
        C = raw64.new_tensor(float(s.reg))
        reg_m, reg_n = state.reg_m, state.reg_n
    return signal.to(raw.dtype), C.to(raw.dtype), DaroState(m, n, reg_m, reg_n)


def _no_reduce(x: Tensor, op: str = "sum") -> Tensor:
    return x


@dataclass(frozen=True)
class Shard:
    """The data-parallel ranks a mini-batch is split over (one process: the default).

    `reduce(x, op)` returns x ('sum' or 'max') combined over the ranks, detached: a collective, so every rank
    calls `Totals.combine` and `MetricSums.combine` for every mini-batch, at the same point.
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

    Counts are the whole mini-batch's (its `Totals`); `mask` and `group_loss` are this part's rows and share.
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
    parts: int = 1  # parts of the mini-batch (passes x ranks, `Totals.parts`); a per-group offset is split over them


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


def register_method(
    name: str,
    advantage: str,
    weights: str = "none",
    label: str | None = None,
    paper: str = "",
    shape: ShapeFn | None = None,
    token_sum: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Add a method to the registry: `@register_method("mine", advantage="group_std", label="Mine")`.

    shape(mu, n_prompts, length_ratio, token_share, sigma_batch): its static shape, if it has one;
    token_sum: its aggregation sums over tokens (per prompt, longer answers weigh more)."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(
            name,
            fn,
            advantage,
            weights,
            (fn.__doc__ or "").strip().splitlines()[0],
            label or name,
            paper,
            shape,
            token_sum,
        )
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


@register_method(
    "dapo", advantage="group_std", label="DAPO", paper="arXiv 2503.14476", shape=_shape_dapo, token_sum=True
)
def dapo(g: GroupView, s: LossSettings) -> Scaling:
    """DAPO (arXiv 2503.14476): group-std advantage, token-mean over the mini-batch."""
    return Scaling(token_mean(g.mask, g.n_tokens))


@register_method(
    "dr_grpo", advantage="mean_only", label="Dr. GRPO", paper="arXiv 2503.20783", shape=_shape_dr_grpo, token_sum=True
)
def dr_grpo(g: GroupView, s: LossSettings) -> Scaling:
    """Dr. GRPO (arXiv 2503.20783): r - mu advantage, sum / (responses * max response length)."""
    L_max = s.max_response_length or g.width or g.mask.shape[1]
    return Scaling(constant_normaliser(g.mask, L_max, g.n_responses))


@register_method(
    "lipo", advantage="batch_std", label="LIPO", paper="Lite PPO, arXiv 2508.08221", shape=_shape_lipo, token_sum=True
)
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
    offset = ((w_full - w_full.detach()) * signal - C * torch.log(w_full)) / g.parts  # each part's share
    return Scaling(coef, torch.where(g.present, offset, torch.zeros_like(offset)))


@register_method("daro", advantage="group_std", weights="learned", label="DARO", paper="arXiv 2510.09001")
def daro(g: GroupView, s: LossSettings) -> Scaling:
    """DARO (arXiv 2510.09001): sum over pass-rate groups of w_mu L_mu - C ln w_mu, w learned."""
    if g.weights is None:
        raise ValueError("method 'daro' needs weights: pass weights=DaroWeights(K)()")
    return _weighted_groups(g, g.weights)


@register_method(
    "static",
    advantage="group_std",
    weights="frozen",
    label="DARO, frozen w",
    paper="DARO's path with frozen weights (docs/math.md, section 4)",
)
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


class _Tokens(NamedTuple):
    """The per-token quantities of one part of a mini-batch, shared by its totals and its loss."""

    k: Tensor  # [B] long
    mask: Tensor  # [B, T] kept tokens (mu in {0, 1} dropped), as weights
    lengths: Tensor  # [B] kept tokens per response
    adv: Tensor  # [B]
    sur: Any  # the clipped surrogate (surrogate.Surrogate)
    l: Tensor  # [B, T] per-token loss l = -A g (+ beta KL), 0 off the kept tokens, differentiable
    g: Tensor  # [B, T] the clipped factor, detached


def _tokens(batch: PolicyBatch, K: int, s: LossSettings) -> _Tokens:
    k = batch.num_correct.long()
    dt = batch.logp.dtype
    interior = (k > 0) & (k < K)  # [B]
    mask = batch.mask.to(dt) * interior[:, None].to(dt)  # [B, T] kept tokens
    # padding may hold anything (even NaN): zero it before exp(), so no NaN reaches a gradient
    on = batch.mask.bool()
    logp = torch.where(on, batch.logp, torch.zeros_like(batch.logp))
    old_logp = torch.where(on, batch.old_logp.to(dt), torch.zeros_like(logp))
    adv = batch.advantages.to(dt)
    sur = clipped_surrogate(logp, old_logp, adv, s.eps_low, s.eps_high, s.dual_clip)
    l = sur.loss  # [B, T] = -A g
    if s.kl_beta > 0:
        if batch.ref_logp is None:
            raise ValueError("kl_beta > 0 needs batch.ref_logp")
        kl = kl_k3(logp, torch.where(on, batch.ref_logp.to(dt), torch.zeros_like(logp)))  # [B, T]
        l = l + s.kl_beta * (kl * torch.exp(logp - old_logp) if s.kl_ratio else kl)
    l = torch.where(mask.bool(), l, torch.zeros_like(l))  # no NaN from padding can leak
    return _Tokens(k, mask, mask.sum(1), adv, sur, l, sur.factor.detach())


def _per_group(x: Tensor, k: Tensor, K: int) -> Tensor:
    """[B] -> [K+1]: the sum of x over the rows of each k."""
    return torch.zeros(K + 1, dtype=x.dtype, device=x.device).index_add(0, k, x)


@dataclass(frozen=True)
class Totals:
    """The whole mini-batch's sums that every part of it is normalised by, passed to the loss as data.

    A mini-batch split into parts (gradient accumulation's passes, data-parallel ranks: as verl passes
    `batch_num_tokens` and TRL `num_items_in_batch`) gives each part's loss the totals of all of them, so each
    part's loss is its exact share of the whole mini-batch's (the shares sum to it):

        totals = Totals.combine([batch_totals(part, K, s) for part in parts], shard)   # sum, then over ranks
        loss_i = loss_terms(method, part_i, K, s, totals=totals).loss                   # backward each

    l_sum and mass_sum need the log-probs (DARO's signal reads them); `batch_totals(..., with_loss=False)`
    counts from the masks alone, which is all a method without weights needs.
    """

    tokens: Tensor  # [K+1] kept tokens per group (mask as weights)
    responses: Tensor  # [] kept responses with at least one token
    l_sum: Tensor  # [K+1] sum of l over each group's tokens, detached (zeros without with_loss)
    mass_sum: Tensor  # [K+1] sum of |A| g over each group's tokens, detached (zeros without with_loss)
    width: int  # padded response length of the mini-batch (its widest part's)
    parts: int = 1  # how many parts the mini-batch is split into: a per-group offset is split evenly over them
    with_loss: bool = True  # l_sum and mass_sum were summed (from log-probs)

    @property
    def K(self) -> int:
        return self.tokens.shape[0] - 1

    @staticmethod
    def combine(parts: "Sequence[Totals]", shard: "Shard | None" = None) -> "Totals":
        """The totals of a mini-batch made of `parts` (this process's passes), summed over them and then over the
        data-parallel ranks of `shard` (two collectives: every rank must call it at the same point)."""
        if not parts:
            raise ValueError("Totals.combine needs at least one part")
        packed = torch.stack(
            [
                torch.cat([t.tokens, t.l_sum, t.mass_sum, t.responses[None], t.responses.new_tensor([float(t.parts)])])
                for t in parts
            ]
        ).sum(0)
        width = max(t.width for t in parts)
        shard = shard or Shard()
        if shard.world_size > 1:
            packed = shard.reduce(packed, "sum")
            width = int(shard.reduce(packed.new_tensor(float(width)), "max"))
        K1 = parts[0].tokens.shape[0]
        return Totals(
            packed[:K1],
            packed[-2],
            packed[K1 : 2 * K1],
            packed[2 * K1 : 3 * K1],
            width,
            int(round(float(packed[-1]))),
            all(t.with_loss for t in parts),
        )


def batch_totals(batch: PolicyBatch, K: int, settings: LossSettings = LossSettings(), with_loss: bool = True) -> Totals:
    """The totals of one part of a mini-batch, by itself (see `Totals`); detached. with_loss=False: from the masks
    and pass rates alone (batch.logp is not read)."""
    if not with_loss:
        k = batch.num_correct.long()
        mask = batch.mask.double() * ((k > 0) & (k < K))[:, None].double()
        lengths = mask.sum(1)
        zeros = torch.zeros(K + 1, dtype=torch.float64, device=mask.device)
        return Totals(
            _per_group(lengths, k, K),
            (lengths > 0).sum().double(),
            zeros,
            zeros.clone(),
            mask.shape[1],
            with_loss=False,
        )
    _validate(batch, K)
    with torch.no_grad():
        return _totals_of(_tokens(batch, K, settings), K)


def _totals_of(t: _Tokens, K: int) -> Totals:
    l_sum = _per_group((t.l * t.mask).sum(1), t.k, K).detach()
    mass_sum = _per_group((t.adv.abs()[:, None] * t.g * t.mask).sum(1), t.k, K)
    return Totals(
        _per_group(t.lengths, t.k, K).detach(),
        (t.lengths > 0).sum().to(t.lengths.dtype),
        l_sum,
        mass_sum,
        t.mask.shape[1],
    )


class LossTerms(NamedTuple):
    """Everything `loss_terms` computes on one mini-batch, or one part of it (per-group tensors indexed by k = 0..K)."""

    loss: Tensor  # [] the part's share of the mini-batch's loss, differentiable
    stats: "MetricSums"  # the part's metric sums: `.finish()` (summed over the parts first) gives the metrics
    contrib: Tensor  # [K+1] C_mu, the part's share, differentiable; sums to `loss`
    group_loss: Tensor  # [K+1] L_mu, the part's share, differentiable
    present: Tensor  # [K+1] bool: interior groups with tokens in the mini-batch
    factor: Tensor  # [B, T] g, the clipped factor of l = -A g, detached
    daro_state: DaroState | None  # the signal state after this update (methods with weights)

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics (the record's keys), when this part is the whole mini-batch; otherwise sum `stats` over the
        parts first (`MetricSums.combine`)."""
        return self.stats.finish()


def policy_loss(
    method: str,
    batch: PolicyBatch,
    K: int,
    settings: LossSettings = LossSettings(),
    weights: Tensor | None = None,
    group_grad_norms: Tensor | None = None,
    totals: Totals | None = None,
    daro_state: DaroState | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss and per-pass-rate metrics of `method` on one mini-batch (the drop-in API; `loss_terms` has the
    per-group terms): (loss [] scalar, metrics dict[str, float]). With `totals` (a part of a split mini-batch) the
    metrics are this part's alone."""
    t = loss_terms(method, batch, K, settings, weights, group_grad_norms, totals, daro_state)
    return t.loss, t.metrics


def loss_terms(
    method: str,
    batch: PolicyBatch,
    K: int,
    settings: LossSettings = LossSettings(),
    weights: Tensor | None = None,
    group_grad_norms: Tensor | None = None,
    totals: Totals | None = None,
    daro_state: DaroState | None = None,
) -> LossTerms:
    """Loss, per-group terms and metric sums of `method` on one mini-batch, or on one part of it. Pure: no
    collective, no logging.

    Args:
        method: a key of METHODS.
        batch: the mini-batch (or a part of it), B responses x T tokens (see PolicyBatch).
        K: responses per prompt; groups are k = 0..K.
        settings: clip ranges, KL, Dr. GRPO's L_max, DARO's signal, regulariser and signal EMA.
        weights: [K-1] DARO weights for k = 1..K-1 ('daro': differentiable; 'static': frozen).
        group_grad_norms: [K-1] ||grad_theta L_mu||, the DARO signal when settings.weight_signal='grad'.
        totals: the whole mini-batch's sums when `batch` is a part of it (`Totals`); None: `batch` is all of it.
        daro_state: the signal state before this update (`DaroWeights.state()`); None: a fresh one. Only
            settings.signal_ema > 0 and reg = 'auto' read it.

    With `totals`, loss, C and L are this part's shares (they sum over the parts to the whole mini-batch's), and
    `stats` summed over the parts (`MetricSums.combine`) finishes into the whole mini-batch's metrics.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    _validate(batch, K)
    spec = METHODS[method]
    B, T = batch.logp.shape
    dt = batch.logp.dtype
    tk = _tokens(batch, K, settings)
    k, mask, l = tk.k, tk.mask, tk.l
    if totals is None:
        totals = _totals_of(tk, K)
    elif totals.tokens.shape != (K + 1,):
        raise ValueError(f"totals are of K = {totals.K}, the loss's K is {K}")
    tokens = totals.tokens.to(dt)
    local_l = _per_group(
        (l * mask).sum(1), k, K
    )  # [K+1] sum of l over each group's tokens (mask as weights), differentiable
    group_loss = local_l / tokens.clamp(min=1)  # [K+1] L_mu (this part's share)
    arange = torch.arange(K + 1, device=k.device)
    present = (tokens > 0) & (arange > 0) & (arange < K)

    signal = reg = new_state = None
    if spec.weights != "none":
        if weights is None or weights.shape != (K - 1,):
            raise ValueError(
                f"method {method!r} needs weights of shape [{K - 1}], got "
                f"{None if weights is None else tuple(weights.shape)}"
            )
        weights = weights.to(dt)
        if settings.weight_signal in ("abs", "signed", "mass") and not totals.with_loss:
            raise ValueError(
                f"weight_signal {settings.weight_signal!r} reads the mini-batch's L_mu: its totals must "
                "be summed from log-probs (batch_totals(..., with_loss=True))"
            )
        L_global = totals.l_sum.to(dt) / tokens.clamp(min=1)  # [K+1] L_mu of the whole mini-batch, detached
        if settings.weight_signal == "abs":
            raw = L_global.abs()
        elif settings.weight_signal == "signed":
            raw = L_global
        elif settings.weight_signal == "mass":
            raw = totals.mass_sum.to(dt) / tokens.clamp(min=1)
        elif settings.weight_signal == "grad":
            if group_grad_norms is None or group_grad_norms.shape != (K - 1,):
                raise ValueError("weight_signal='grad' needs group_grad_norms of shape [K-1]")
            z = group_grad_norms.new_zeros(1)
            raw = torch.cat([z, group_grad_norms.detach(), z]).to(dt)
        else:
            raise ValueError(f"unknown weight_signal {settings.weight_signal!r}: one of {', '.join(SIGNALS)}")
        signal, reg, new_state = read_signal(raw, present, settings, daro_state)

    view = GroupView(
        K,
        k,
        mask,
        totals.responses.to(dt),
        group_loss,
        present,
        weights,
        signal,
        reg,
        tokens,
        tokens.sum(),
        totals.width,
        totals.parts,
    )
    scaling = spec.fn(view, settings)
    contrib = _per_group((scaling.coef * l).sum(1), k, K)  # [K+1] C_mu without offsets
    if scaling.offset is not None:
        contrib = contrib + scaling.offset
    if B == 0 or not present.any():
        loss = l.sum() * 0.0  # defined, zero, and still attached to the graph
    else:
        loss = contrib.sum()
    stats = _metric_sums(K, batch, tk, scaling, contrib, loss, totals, present, weights, signal, reg)
    return LossTerms(loss, stats, contrib, group_loss, present, tk.g, new_state)


# ---------------------------------------------------------------------------------------------
# Metrics: sums over a part, added over the parts, then finished into the record's keys

_GROUP_SUMS = (
    "l_sum",
    "mass_sum",
    "scale",
    "contrib",
    "prompts",
    "offset",
    "n_corr",
    "n_inc",
    "len_corr",
    "len_inc",
    "clip_pos",
    "pos",
    "clip_neg",
    "neg",
)
_SCALAR_SUMS = ("loss", "responses", "empty", "clip_pos", "pos", "clip_neg", "neg", "clip_all", "ratio")


@dataclass
class MetricSums:
    """The additive part of a mini-batch's metrics, and what they are finished with.

    A part's sums add up over the parts of a split mini-batch (`combine`: its passes, then the data-parallel
    ranks); `finish()` turns the whole mini-batch's into the metrics dict. The rest (`totals`, the weights,
    the signal and C) is the whole mini-batch's already, identical in every part.
    """

    sums: Tensor  # [len(_GROUP_SUMS) * (K+1) + len(_SCALAR_SUMS)] float64
    ratio_max: Tensor  # [] float64, the largest ratio on a response token (-inf: none)
    totals: Totals
    present: Tensor  # [K+1] bool
    weights: Tensor | None  # [K-1] the weights the loss used, detached
    signal: Tensor | None  # [K+1]
    reg: Tensor | None  # []
    has_offset: bool

    @staticmethod
    def combine(parts: "Sequence[MetricSums]", shard: "Shard | None" = None) -> "MetricSums":
        """The sums of the whole mini-batch: over `parts`, then over the ranks of `shard` (two collectives)."""
        first = parts[0]
        sums = torch.stack([p.sums for p in parts]).sum(0)
        top = torch.stack([p.ratio_max for p in parts]).max()
        shard = shard or Shard()
        if shard.world_size > 1:
            sums, top = shard.reduce(sums, "sum"), shard.reduce(top, "max")
        return dataclasses.replace(first, sums=sums, ratio_max=top)

    @torch.no_grad()
    def finish(self) -> dict[str, float]:
        """The metrics, keyed by the record's vocabulary (daro_lab.record)."""
        K = self.totals.K
        flat = self.sums.tolist()
        G = len(_GROUP_SUMS) * (K + 1)
        g = {name: flat[i * (K + 1) : (i + 1) * (K + 1)] for i, name in enumerate(_GROUP_SUMS)}
        t = dict(zip(_SCALAR_SUMS, flat[G:]))
        ratio_max = float(self.ratio_max)
        tokens = self.totals.tokens.double().tolist()

        def div(a: float, b: float) -> float:
            return a / max(b, 1.0)

        L = [div(a, b) for a, b in zip(g["l_sum"], tokens)]
        cols = {
            "loss": L,
            "contrib": g["contrib"],
            "scale": g["scale"],
            "prompts": g["prompts"],
            "tokens": tokens,
            "mass": [div(a, b) for a, b in zip(g["mass_sum"], tokens)],
            "len_correct": [div(a, b) for a, b in zip(g["len_corr"], g["n_corr"])],
            "len_incorrect": [div(a, b) for a, b in zip(g["len_inc"], g["n_inc"])],
            "clipfrac_pos": [div(a, b) for a, b in zip(g["clip_pos"], g["pos"])],
            "clipfrac_neg": [div(a, b) for a, b in zip(g["clip_neg"], g["neg"])],
        }
        if self.has_offset:
            cols["contrib_offset"] = g["offset"]  # DARO's -C ln w_mu: part of C_mu, without a theta-gradient
        if self.weights is not None:
            w_full = [1.0, *self.weights.double().tolist(), 1.0]
            signal = self.signal.double().tolist()
            reg = float(self.reg)
            cols["daro/weight_used"] = w_full  # the weights this loss used (the step records the weights after it)
            cols["daro/wL"] = [w * x for w, x in zip(w_full, L)]
            cols["daro/signal"] = signal
            cols["daro/wS"] = [w * x / reg for w, x in zip(w_full, signal)]  # 1 at the fixed point w = C / signal
        out: dict[str, float] = {}
        for kk in torch.nonzero(self.present).flatten().tolist():
            key = mu_key(kk, K)
            for name, v in cols.items():
                out[f"{name}/{key}"] = v[kk]
        n_tok = sum(tokens[1:K])
        out.update(
            {
                LOSS_TOTAL: t["loss"],
                "batch/responses": t["responses"],
                "batch/tokens": n_tok,
                "batch/empty_responses": t["empty"],
                "batch/prompts": sum(g["prompts"]),
                "clipfrac/pos": div(t["clip_pos"], t["pos"]),
                "clipfrac/neg": div(t["clip_neg"], t["neg"]),
                "clipfrac/all": div(t["clip_all"], n_tok),
                "ratio/max": ratio_max if math.isfinite(ratio_max) else 1.0,
                "ratio/mean": div(t["ratio"], n_tok),
            }
        )
        if self.weights is not None and self.signal is not None:
            # with the signed signal, L_mu <= 0 has no finite fixed point: the weight runs to its bound
            out["daro/nonpositive_signal"] = float(((self.signal <= 0) & self.present).sum())
            out["daro/reg"] = float(self.reg)
        return out


@torch.no_grad()
def _metric_sums(K, batch, tk: _Tokens, scaling, contrib, loss, totals, present, weights, signal, reg) -> MetricSums:
    """This part's metric sums: counts and sums over its rows (filler rows, prompt index -1, count for nothing)."""
    k = tk.k
    dt = torch.float64

    def per_group(x: Tensor) -> Tensor:
        return _per_group(x, k, K)

    mask = tk.mask.to(dt)
    valid = (batch.prompt_index >= 0).to(dt)  # [B] 0 on filler rows
    adv = tk.adv.to(dt)
    correct = (batch.rewards > 0.5).to(dt) * valid
    incorrect = (1 - correct) * valid
    raw_len = batch.mask.to(dt).sum(1)  # lengths before dropping mu in {0, 1}
    pos = (adv > 0)[:, None].to(dt) * mask
    neg = (adv < 0)[:, None].to(dt) * mask
    clipped = tk.sur.clipped.to(dt)
    ratio = tk.sur.ratio.detach().to(dt)
    # prompts per k: one k per prompt index
    real = batch.prompt_index >= 0
    uniq, inv = torch.unique(batch.prompt_index[real], return_inverse=True)
    k_of_prompt = torch.zeros(len(uniq), dtype=torch.long, device=k.device).scatter_(0, inv, k[real])
    group = {
        "l_sum": per_group((tk.l.detach().to(dt) * mask).sum(1)),
        "mass_sum": per_group((adv.abs()[:, None] * tk.g.to(dt) * mask).sum(1)),
        "scale": per_group((scaling.coef.detach().to(dt) * adv.abs()[:, None]).sum(1)),  # S_mu
        "contrib": contrib.detach().to(dt),
        "prompts": torch.bincount(k_of_prompt, minlength=K + 1).to(dt),
        "offset": (
            scaling.offset.detach().to(dt)
            if scaling.offset is not None
            else torch.zeros(K + 1, dtype=dt, device=k.device)
        ),
        "n_corr": per_group(correct),
        "n_inc": per_group(incorrect),
        "len_corr": per_group(raw_len * correct),
        "len_inc": per_group(raw_len * incorrect),
        "clip_pos": per_group((clipped * pos).sum(1)),
        "pos": per_group(pos.sum(1)),
        "clip_neg": per_group((clipped * neg).sum(1)),
        "neg": per_group(neg.sum(1)),
    }
    scalar = {
        "loss": loss.detach().to(dt),
        "responses": (tk.lengths > 0).sum().to(dt),
        "empty": ((raw_len == 0).to(dt) * valid).sum(),
        "clip_pos": (clipped * pos).sum(),
        "pos": pos.sum(),
        "clip_neg": (clipped * neg).sum(),
        "neg": neg.sum(),
        "clip_all": (clipped * mask).sum(),
        "ratio": (ratio * mask).sum(),
    }
    sums = torch.cat(
        [torch.stack([group[n] for n in _GROUP_SUMS]).flatten(), torch.stack([scalar[n] for n in _SCALAR_SUMS])]
    )
    on = batch.mask.bool()
    top = ratio[on].max() if on.any() else ratio.new_tensor(-math.inf)
    return MetricSums(
        sums,
        top,
        totals,
        present.clone(),
        None if weights is None else weights.detach(),
        None if signal is None else signal.detach(),
        None if reg is None else reg.detach(),
        scaling.offset is not None,
    )


def group_keys(metrics: dict[str, float], name: str) -> dict[int, float]:
    """{k: value} of one per-group quantity, e.g. group_keys(m, 'loss') -> {3: L_3of8, ...} (record.group_values)."""
    return group_values(metrics, name)


def static_shape(
    method: str,
    mu: float | Tensor,
    n_prompts: int,
    length_ratio: float = 1.0,
    token_share: float | None = None,
    sigma_batch: float | None = None,
):
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


def length_corrected_shape(
    method: str, k: int, K: int, len_correct: float, len_incorrect: float, std: str = "unbiased", eps: float = 1e-6
) -> float:
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
