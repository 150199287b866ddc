"""One exact mini-batch update, written once: the loss of a mini-batch split into passes (and data-parallel ranks),
its gradients accumulated so they equal the gradients of one pass over the whole mini-batch, and what the step
records of it (docs/math.md, section 3).

    totals    the mini-batch's sums over all its passes and ranks (tokens per group, L_mu, ...): a no-grad forward
              of every pass; one pass: its own forward, kept for everything below
    signal    DARO's 'grad' reading: ||grad L_mu|| of the whole mini-batch, per group
    G_mu      ||grad C_mu|| and ||grad L_mu|| of the whole mini-batch, and the cosines between the groups'
              grad C_mu (on the steps that measure them)
    backward  every pass's exact share of the mini-batch's loss, given the totals (DDP: all-reduced once, at the last)

One pass in one process is the case M = 1, world = 1 of the same code, not a second path. How the model runs
(log-probs, DDP's no_sync, gradient norms under FSDP) is the `Runtime`'s: the trainer's is `PolicyRuntime`, the
testbed's `testbed.loop.TestbedRuntime`, TRL's `integrations.trl.TRLRuntime`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from daro_lab.algorithms import (
    METHODS,
    DaroState,
    LossSettings,
    LossTerms,
    MetricSums,
    PolicyBatch,
    Shard,
    Totals,
    batch_totals,
    loss_terms,
)
from daro_lab.record import mu_key
from daro_lab.rollout import RolloutBatch
from daro_lab.trainer import fsdp


class Runtime(Protocol):
    """What the update needs of the model: a pass's batch, gradients, and their norms."""

    def batch(self, part: Any, forward: bool = True) -> PolicyBatch:
        """The loss's view of one pass; forward False: log-probs left at 0 (only the masks are read)."""

    def no_sync(self, skip: bool):
        """Context: DDP skips the gradient all-reduce of this backward (skip True); otherwise a no-op."""

    def grad_vectors(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """d x / d theta of each scalar x of the whole mini-batch as one flat vector, keeping the graph (data-parallel:
        summed over the ranks; FSDP: this rank's shard of it)."""

    def grad_vector(self) -> torch.Tensor:
        """The gradient the parameters hold now, as one flat vector (same convention)."""

    def gram(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """[n, n] float64 inner products of the vectors (FSDP: summed over the ranks' shards, a collective)."""

    def backward(self, loss: torch.Tensor) -> None:
        """The update's backward of one pass's loss share (TRL: through accelerate, which applies its loss scaler)."""

    def zero_grad(self) -> None: ...


@dataclass
class MinibatchResult:
    """What one mini-batch's update produced, its gradients left in the parameters' .grad."""

    metrics: dict[str, float]  # the loss's metrics of the whole mini-batch (every pass and rank), G_mu included
    present: torch.Tensor  # [K+1] bool: the interior groups with tokens in the mini-batch
    batch: PolicyBatch  # this rank's passes, concatenated, detached (the hooks' view)
    factor: torch.Tensor  # [B, T] the clipped factor g of this rank's rows
    daro_state: DaroState | None  # DARO's signal state after this update (every pass's: it reads the totals only)


Pick = Callable[[LossTerms], torch.Tensor]


def backward_minibatch(
    method: str,
    passes: Sequence[Any],
    K: int,
    settings: LossSettings,
    shard: Shard,
    runtime: Runtime,
    weights=None,
    measure_groups: bool = False,
    cosines: bool = True,
) -> MinibatchResult:
    """The exact update of one mini-batch given as `passes` (this rank's; every rank calls it with as many):
    leaves the gradient of the whole mini-batch's loss (this rank's share, DDP-summed) in .grad.

    weights: the DARO weights module (`DaroWeights`) for methods with weights, else None.
    measure_groups: also measure the groups' gradients: G_mu = ||grad C_mu|| and ||grad L_mu|| (metrics
        `gradnorm/..`, `gradnorm_L/..`), the cosine of each group's grad C_mu with the other groups' summed
        (`gradcos/..`) and the mean pairwise cosine between the groups' grad C_mu (`grad/cos_mean`).
    cosines: False measures the norms alone, one gradient at a time (the cosines hold every group's at once).
    """
    spec = METHODS[method]
    M, world = len(passes), shard.world_size
    state = weights.state() if weights is not None else None

    def terms(b: PolicyBatch, totals: Totals, group_norms) -> LossTerms:
        w = weights() if weights is not None else None  # a fresh graph for each backward
        return loss_terms(
            method, b, K, settings, weights=w, group_grad_norms=group_norms, totals=totals, daro_state=state
        )

    kept = None  # one pass: its batch with the graph, shared by the totals, the norms and the backward
    if M == 1:
        kept = runtime.batch(passes[0])
        # one process: the loss counts the totals from the batch itself (no second pass over its tokens)
        totals = Totals.combine([batch_totals(kept, K, settings)], shard) if world > 1 else None
    else:
        reads_loss = spec.weights != "none"  # DARO's signal (and its record on the frozen path) reads L_mu
        with torch.no_grad():
            totals = Totals.combine(
                [batch_totals(runtime.batch(p, forward=reads_loss), K, settings, with_loss=reads_loss) for p in passes],
                shard,
            )

    def vectors(picks: list[Pick], group_norms, t1: LossTerms | None = None) -> list[torch.Tensor]:
        """The whole mini-batch's gradient of pick(terms) for each pick: from the kept graph, or M passes each."""
        if kept is not None:
            t = t1 if t1 is not None else terms(kept, totals, group_norms)
            return runtime.grad_vectors([pick(t) for pick in picks])
        out = []
        for pick in picks:
            runtime.zero_grad()
            for i, p in enumerate(passes):
                with runtime.no_sync(i < M - 1):
                    (pick(terms(runtime.batch(p), totals, group_norms)) * world).backward()
            out.append(runtime.grad_vector())
        return out

    def norms(picks: list[Pick], group_norms, t1: LossTerms | None = None) -> list[float]:
        """||the whole mini-batch's gradient of pick(terms)||, one gradient held at a time."""
        if kept is not None and t1 is None:  # one loss evaluation for every pick
            t1 = terms(kept, totals, group_norms)
        return [float(runtime.gram(vectors([pick], group_norms, t1))[0, 0].clamp(min=0).sqrt()) for pick in picks]

    group_norms = None  # DARO's 'grad' reading: [K-1] ||grad L_mu||, measured with the signal zeroed
    if spec.weights == "learned" and settings.weight_signal == "grad":
        dev = kept.logp.device if kept is not None else totals.tokens.device
        group_norms = torch.tensor(
            norms([_pick("group_loss", kk) for kk in range(1, K)], torch.zeros(K - 1, device=dev)), device=dev
        )
    t1 = terms(kept, totals, group_norms) if kept is not None else None
    present = t1.present if t1 is not None else (totals.tokens > 0)  # [K+1]; t1's is the interior groups'
    ks = [kk for kk in range(1, K) if bool(present[kk])]
    geometry = {}
    if measure_groups and ks:  # before the update's backward (M passes zero the gradients; one pass keeps its graph)
        C = [_pick("contrib", kk) for kk in ks]
        geometry = (
            group_geometry(runtime.gram(vectors(C, group_norms, t1)), ks, K)
            if cosines
            else {f"gradnorm/{mu_key(kk, K)}": v for kk, v in zip(ks, norms(C, group_norms, t1))}
        )
        geometry.update(
            {
                f"gradnorm_L/{mu_key(kk, K)}": v
                for kk, v in zip(ks, norms([_pick("group_loss", kk) for kk in ks], group_norms, t1))
            }
        )
    runtime.zero_grad()
    out: list[tuple[LossTerms, PolicyBatch]] = []
    for i, p in enumerate(passes):
        with runtime.no_sync(i < M - 1):  # DDP: all-reduce the accumulated gradients once, at the last pass
            b = kept if kept is not None else runtime.batch(p)
            t = t1 if t1 is not None else terms(b, totals, group_norms)
            runtime.backward(t.loss * world)  # this rank's share of the mini-batch's loss; DDP averages, so scale up
        out.append((t, dataclasses.replace(b, logp=b.logp.detach())))
    metrics = {**MetricSums.combine([t.stats for t, _ in out], shard).finish(), **geometry}
    return MinibatchResult(
        metrics,
        out[0][0].present,
        cat_batches([b for _, b in out]),
        pad_cat([t.factor for t, _ in out]),
        out[0][0].daro_state,
    )


def group_geometry(gram: torch.Tensor, ks: list[int], K: int) -> dict[str, float]:
    """From the Gram matrix [n, n] of the groups ks' gradients of C_mu: G_mu (`gradnorm`), the cosine of each with
    the sum of the others (`gradcos`: 1 when every group pushes the same way, 0 when the others are orthogonal to
    it), and the mean pairwise cosine (`grad/cos_mean`, with two groups or more)."""
    gram = gram.double()
    norm = gram.diagonal().clamp(min=0).sqrt()  # [n]
    out = {f"gradnorm/{mu_key(kk, K)}": float(v) for kk, v in zip(ks, norm)}
    n = len(ks)
    if n < 2:
        return out
    others = gram.sum(1) - gram.diagonal()  # [n] <g_i, sum_{j != i} g_j>
    rest = (gram.sum() - 2 * gram.sum(1) + gram.diagonal()).clamp(min=0).sqrt()  # [n] ||sum_{j != i} g_j||
    cos = others / (norm * rest).clamp(min=1e-30)
    out.update({f"gradcos/{mu_key(kk, K)}": float(c) for kk, c in zip(ks, cos)})
    pair = gram / (norm[:, None] * norm[None, :]).clamp(min=1e-30)
    iu = torch.triu_indices(n, n, 1)
    out["grad/cos_mean"] = float(pair[iu[0], iu[1]].mean())
    return out


def _pick(name: str, k: int) -> Pick:
    return lambda t: getattr(t, name)[k]


# ---------------------------------------------------------------------------------------------
# The trainer's runtime: the Policy (DDP or FSDP2) and its optimizer


@dataclass
class Pass:
    """The data of one forward/backward pass: rows of the step's rollout, their prompts' advantages and rewards
    [p, K], and the log-probs computed before the step's first update: the sampling policy's for an off-policy
    mini-batch (None on-policy: the current ones are the old ones) and the reference model's (KL)."""

    rows: RolloutBatch
    advantages: torch.Tensor  # [p, K]
    rewards: torch.Tensor  # [p, K]
    old_logp: torch.Tensor | None = None  # [B, T]
    ref_logp: torch.Tensor | None = None  # [B, T]


class PolicyRuntime:
    """The trainer's `Runtime`: log-probs from the Policy, gradients of the optimizer's policy parameters."""

    def __init__(self, policy, opt: torch.optim.Optimizer, shard: Shard, K: int, device: torch.device):
        self.policy, self.opt, self.shard, self.K, self.device = policy, opt, shard, K, device

    @property
    def params(self) -> list[torch.Tensor]:
        # the optimizer's own list: under FSDP the sharded parameters (the module shows the root's unsharded ones
        # between its forward and backward)
        return next(g["params"] for g in self.opt.param_groups if g.get("name") == "policy")

    def batch(self, p: Pass, forward: bool = True) -> PolicyBatch:
        logp = (
            self.policy.logprobs(p.rows) if forward else torch.zeros(p.rows.response_mask.shape, device=self.device)
        )  # [B, T]
        dev = logp.device
        k = p.rewards.sum(1).round().long().repeat_interleave(self.K).to(dev)  # filler rows: k = 0, no tokens
        return PolicyBatch(
            logp=logp,
            old_logp=logp.detach() if p.old_logp is None else p.old_logp,
            mask=p.rows.response_mask.to(dev, logp.dtype),
            advantages=p.advantages.flatten().to(dev),
            num_correct=k,
            rewards=p.rewards.flatten().to(dev),
            prompt_index=p.rows.prompt_index.to(dev),
            ref_logp=p.ref_logp,
        )

    def no_sync(self, skip: bool):
        return self.policy.no_sync(skip)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def grad_vector(self) -> torch.Tensor:
        """Under FSDP this rank's shards (local tensors of the sharded gradients)."""
        return torch.cat(
            [_local(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in self.params]
        )

    def grad_vectors(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        params = self.params
        if not self.policy.fsdp:
            flats = [flat_grad(x, params).float() for x in xs]
            return flats if self.shard.world_size == 1 else [self.shard.reduce(f, "sum") for f in flats]
        # FSDP: gradients exist only as reduce-scattered shards (averaged over ranks), so each is a backward of its
        # own, run by every rank in the same order
        out = []
        for x in xs:
            self.zero_grad()
            (x * self.shard.world_size).backward(retain_graph=True)
            out.append(self.grad_vector())
        self.zero_grad()
        return out

    def gram(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        if not vectors:
            return torch.zeros(0, 0, dtype=torch.float64)
        V = torch.stack(vectors).double()  # [n, D]
        g = V @ V.T
        return self.shard.reduce(g, "sum") if self.policy.fsdp and self.shard.world_size > 1 else g


def flat_grad(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d x / d params as one flat vector (zeros where x does not reach), keeping the graph."""
    grads = (
        torch.autograd.grad(x, params, retain_graph=True, allow_unused=True)
        if x.requires_grad
        else [None] * len(params)
    )
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) gradient; a plain tensor as it is."""
    return t.to_local() if fsdp.is_sharded(t) else t


def pad_cat(xs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [b_i, T_i] tensors over rows, right-padding the token dimension with 0 to the widest."""
    T = max(x.shape[1] for x in xs)
    return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) for x in xs])


def cat_batches(bs: list[PolicyBatch]) -> PolicyBatch:
    """Concatenate policy batches over rows, right-padding the token dimension to the widest."""

    def cat(name):
        xs = [getattr(b, name) for b in bs]
        if xs[0] is None:
            return None
        return pad_cat(xs) if xs[0].dim() == 2 else torch.cat(xs)

    return PolicyBatch(**{f.name: cat(f.name) for f in dataclasses.fields(PolicyBatch)})
