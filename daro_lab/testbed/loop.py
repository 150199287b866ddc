"""One testbed run: sample, score, advantages, one on-policy update through the trainer's update unit, per step.

    for step in 1..steps:
        N prompts -> K answers each ~ softmax(logits)      rewards [N, K] in {0, 1}
        keep 0 < mu < 1 -> advantages (the method's estimator)
        token rows: answer i of length L_i has L_i tokens of log-prob log pi(answer) / L_i, so a token-sum of
            the per-token loss is the sequence's, and every normaliser (1/|o|, 1/tokens, 1/L_max) sees real lengths
        backward_minibatch (daro_lab/trainer/update.py, the trainer's own: loss_terms, and every grad_every steps
            G_mu and the cosines between the groups' gradients) -> clip -> AdamW/SGD (policy + DARO weights)
        -> project the weights
    the exact expected accuracy after every step

One pass in one process, on-policy: the trainer's update on a model whose log-probs are exact, so the per-mu
quantities (the unit's metrics) are the record's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from daro_lab.ablation.summary import coefficient_of_variation
from daro_lab.algorithms import METHODS, DaroWeights, LossSettings, PolicyBatch, Shard, compute_advantages, kept_prompts
from daro_lab.testbed.model import RIGHT, SyntheticPolicy, TestbedConfig
from daro_lab.trainer.setup import mass_fixed_point_weights
from daro_lab.trainer.update import backward_minibatch, flat_grad


@dataclass(frozen=True)
class Arm:
    """A method and its DARO reading: what one arm of a testbed comparison runs."""

    name: str  # the arm's label in tables and figures
    method: str  # a key of the method registry
    signal: str = "mass"  # DARO: what drives the weights (algo.daro.signal)
    reg: float | str = "auto"  # DARO: the regulariser's constant C (algo.daro.reg)
    lr_w: float = 1e-2  # DARO: the weights' learning rate (algo.daro.lr_w)
    signal_ema: float = 0.0  # DARO: the signal's EMA decay (algo.daro.signal_ema)
    static: str = "ones"  # 'static': 'ones' or 'shape:mass' (the closed form DARO-mass converges to)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"arm {self.name!r}: unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")
        if self.static not in ("ones", "shape:mass"):
            raise ValueError(f"arm {self.name!r}: static must be 'ones' or 'shape:mass', got {self.static!r}")

    @property
    def reading(self) -> str:
        """What the arm runs, as its label should say (signal, C, lr_w)."""
        spec = METHODS[self.method]
        if spec.weights == "learned":
            ema = f", ema {self.signal_ema:g}" if self.signal_ema else ""
            return f"{spec.label} ({self.signal}, C={self.reg}, lr_w {self.lr_w:g}{ema})"
        if spec.weights == "frozen":
            return f"{spec.label} (w = {'1' if self.static == 'ones' else 'closed form of DARO-mass'})"
        return spec.label


ARMS: dict[str, Arm] = {
    a.name: a
    for a in [
        Arm("grpo", "grpo"),
        Arm("dapo", "dapo"),
        Arm("dr_grpo", "dr_grpo"),
        Arm("lipo", "lipo"),
        Arm("frozen-1", "static", static="ones"),
        Arm("frozen-mass", "static", static="shape:mass"),
        Arm("daro-mass", "daro", signal="mass"),
        Arm("daro-abs", "daro", signal="abs", signal_ema=0.9),
    ]
}


@dataclass
class RunRecord:
    """What one run measured. acc and level_acc start at step 0 (before any update)."""

    acc: np.ndarray  # [steps + 1] exact expected accuracy
    level_acc: np.ndarray  # [steps + 1, levels]
    grad_norm: np.ndarray  # [steps] the policy gradient's norm before clipping (NaN: no prompt kept)
    clipped: np.ndarray  # [steps] 1 where the clip cut the update
    kept: np.ndarray  # [steps] prompts with 0 < mu < 1
    cosine: list[float] = field(default_factory=list)  # per grad step: mean pairwise cosine of the groups' grad C_mu
    g_share_cv: list[float] = field(default_factory=list)  # per grad step: CV across groups of G_mu's share
    weights: dict[int, float] = field(default_factory=dict)  # DARO / frozen weights after the last step
    run_on: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))  # run-on shares among the
    # (right, wrong) answers at the start and after the last step (SyntheticPolicy.run_on_shares)


def _optimizer(cfg: TestbedConfig, policy: SyntheticPolicy, weights: DaroWeights | None, arm: Arm):
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr, "name": "policy"}]
    if weights is not None and METHODS[arm.method].weights == "learned":
        groups.append(weights.param_group(arm.lr_w))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)


def token_batch(
    logits: torch.Tensor, answers: torch.Tensor, lengths: torch.Tensor, rewards: torch.Tensor, adv: torch.Tensor
) -> PolicyBatch:
    """The loss's view of n prompts' K answers: logits [n, 4], answers [n, K], lengths [n, 4] (tokens of each
    answer), rewards and advantages [n, K]. Answer i of length L_i is L_i tokens of log-prob log pi(i) / L_i."""
    n, K = answers.shape
    seq = torch.log_softmax(logits, -1).gather(1, answers)  # [n, K] differentiable
    L = lengths.gather(1, answers).flatten()  # [n K]
    T = int(L.max())
    mask = (torch.arange(T)[None, :] < L[:, None]).float()  # [n K, T]
    logp = (seq.flatten() / L)[:, None] * mask  # [n K, T]
    k = rewards.sum(1).round().long().repeat_interleave(K)
    return PolicyBatch(
        logp=logp,
        old_logp=logp.detach(),
        mask=mask,
        advantages=adv.flatten(),
        num_correct=k,
        rewards=rewards.flatten(),
        prompt_index=torch.arange(n).repeat_interleave(K),
    )


class TestbedRuntime:
    """The update unit's `Runtime` for the synthetic policy: one process, exact gradients by autograd."""

    def __init__(self, policy: SyntheticPolicy, opt: torch.optim.Optimizer):
        self.policy, self.opt = policy, opt
        self.params = list(policy.parameters())

    def batch(self, part: tuple, forward: bool = True) -> PolicyBatch:
        idx, answers, rewards, adv = part
        return token_batch(self.policy(idx), answers, self.policy.lengths[idx], rewards, adv)

    def no_sync(self, skip: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_vectors(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [flat_grad(x, self.params) for x in xs]

    def grad_vector(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])

    def gram(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        V = torch.stack(vectors).double() if vectors else torch.zeros(0, 0, dtype=torch.float64)
        return V @ V.T

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def run_seed(cfg: TestbedConfig, arm: Arm, seed: int) -> RunRecord:
    """One run of `arm` on the testbed from seed `seed` (the start's jitter, the prompts and the samples)."""
    torch.manual_seed(seed)
    spec = METHODS[arm.method]
    policy = SyntheticPolicy(cfg, seed)
    K, N = cfg.K, cfg.prompts_per_step
    settings = LossSettings(
        max_response_length=int(policy.lengths.max()), weight_signal=arm.signal, reg=arm.reg, signal_ema=arm.signal_ema
    )
    weights = None
    if spec.weights != "none":
        weights = DaroWeights(K)
        if spec.weights == "frozen":
            weights.load_values({k: 1.0 for k in range(1, K)} if arm.static == "ones" else mass_fixed_point_weights(K))
            weights.requires_grad_(False)
    opt = _optimizer(cfg, policy, weights, arm)
    runtime = TestbedRuntime(policy, opt)
    gen = torch.Generator().manual_seed(seed + 1)
    P = len(policy.level)
    acc0, lev0 = policy.accuracy()
    run_on0 = policy.run_on_shares()
    acc, level_acc = [acc0], [lev0]
    grad_norm, clipped, kept_n = (np.full(cfg.steps, np.nan) for _ in range(3))
    rec = RunRecord(np.array([]), np.array([]), grad_norm, clipped, kept_n)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    for step in range(1, cfg.steps + 1):
        prompts = torch.randperm(P, generator=gen)[:N]  # [N]
        with torch.no_grad():
            probs = torch.softmax(policy(prompts), -1)  # [N, 4]
        answers = torch.multinomial(probs, K, replacement=True, generator=gen)  # [N, K]
        rewards = RIGHT[answers].float()  # [N, K]
        keep = kept_prompts(rewards)
        kept_n[step - 1] = float(keep.sum())
        if keep.any():
            adv = compute_advantages(rewards[keep], spec.advantage)
            measure = bool(cfg.grad_every) and (step % cfg.grad_every == 0 or step == 1)
            r = backward_minibatch(
                arm.method,
                [(prompts[keep], answers[keep], rewards[keep], adv)],
                K,
                settings,
                Shard(),
                runtime,
                weights,
                measure_groups=measure,
            )
            if measure:
                rec.cosine.append(r.metrics.get("grad/cos_mean", math.nan))
                rec.g_share_cv.append(
                    coefficient_of_variation([v for key, v in r.metrics.items() if key.startswith("gradnorm/")])
                )
            gn = float(torch.nn.utils.clip_grad_norm_(runtime.params, clip))
            grad_norm[step - 1], clipped[step - 1] = gn, float(gn > clip)
            if weights is not None and spec.weights == "learned":
                weights.release_absent(r.present[1:K])
            opt.step()
            if weights is not None:
                weights.project_()
                weights.set_state(r.daro_state)
        a, lev = policy.accuracy()
        acc.append(a), level_acc.append(lev)
    rec.acc, rec.level_acc = np.asarray(acc), np.asarray(level_acc)
    rec.weights = weights.as_dict() if weights is not None else {}
    rec.run_on = (run_on0, policy.run_on_shares())
    return rec
