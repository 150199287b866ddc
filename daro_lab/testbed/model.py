"""The synthetic policy: per-prompt softmax over four answers of known lengths, with a sharing knob.

    answers r:   0 right/short   1 right/run-on   2 wrong/short   3 wrong/run-on
    logits [P, 4] = start [P, 4] + E [4, d] ((1 - sharing) theta [P, d] + sharing phi [d])

`start` puts prompt p of level j at pass rate p0_j (jittered per prompt by the seed: varied warm starts), with a
share of run-on answers among its right (`run_on_right`) and wrong (`run_on_wrong`) ones. E is the identity when
the policy may learn how long it answers (`lengths = 'learned'`, d = 4); with `lengths = 'fixed'` (d = 2) it only
moves right against wrong, so the run-on shares, and the length gap between right and wrong answers, persist.
theta is each prompt's own parameters, phi one shared vector: sharing 0 makes the pass-rate groups' gradients
orthogonal (disjoint parameters), sharing 1 aligned (every prompt moves along the same d directions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

RESPONSES = ("right/short", "right/run-on", "wrong/short", "wrong/run-on")
RIGHT = torch.tensor([True, True, False, False])


def _parse_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    return vals


@dataclass
class TestbedConfig:
    """The synthetic task, policy and optimiser (every field is a knob of the testbed)."""

    __test__ = False  # not a pytest class

    K: int = 8  # answers sampled per prompt
    levels: str = "0.85,0.6,0.35,0.15"  # each difficulty level's starting pass rate p0, easiest first
    level_mix: str = "1,1,1,1"  # relative number of prompts per level (e.g. '4,3,2,1': easy-heavy)
    prompts: int = 64  # prompts in the pool (split over the levels by level_mix)
    prompts_per_step: int = 16  # N prompts sampled per step (with replacement across steps, without within one)
    start_jitter: float = 0.5  # sd of each prompt's start logit around its level's (per seed: varied warm starts)
    len_short: int = 8  # tokens of a short answer at the easiest level
    len_run_on: int = 32  # tokens of a run-on answer at the easiest level
    level_length_growth: float = 0.0  # each harder level's answers are this fraction longer than the previous one's
    run_on_right: float = 0.2  # share of run-on answers among the right ones at the start
    run_on_wrong: float = 0.7  # share of run-on answers among the wrong ones at the start (the length gap)
    lengths: str = "learned"  # 'learned': the policy may change its run-on shares; 'fixed': the gap persists
    sharing: float = 0.0  # 0: each prompt its own parameters (orthogonal groups) .. 1: one shared vector (aligned)
    optimizer: str = "adam"  # 'adam' (AdamW, betas 0.9/0.999, no decay) or 'sgd'
    lr: float = 0.05  # the policy's learning rate
    grad_clip: float = 0.0  # clip the policy gradient's norm to this (0: off)
    steps: int = 150  # updates per run
    grad_every: int = 10  # per-group gradient norms and cosines every this many steps (0: never)

    def __post_init__(self):
        self.check()

    def level_p0(self) -> tuple[float, ...]:
        return _parse_floats(self.levels, "levels")

    def mix(self) -> tuple[float, ...]:
        return _parse_floats(self.level_mix, "level_mix")

    def check(self) -> None:
        """ValueError naming the knob and its value."""
        p0, mix = self.level_p0(), self.mix()
        if not all(0 < p < 1 for p in p0):
            raise ValueError(f"levels: every starting pass rate must lie in (0, 1), got {self.levels!r}")
        if len(mix) != len(p0) or not all(math.isfinite(m) and m > 0 for m in mix):
            raise ValueError(
                f"level_mix: {len(p0)} positive weights (one per level; leave a level out of `levels` "
                f"instead of weighting it 0), got {self.level_mix!r}"
            )
        ints = {
            "K": (2, 256),
            "prompts": (1, 100_000),
            "prompts_per_step": (1, self.prompts),
            "len_short": (1, 4096),
            "len_run_on": (1, 4096),
            "steps": (1, 1_000_000),
            "grad_every": (0, 1_000_000),
        }
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}: an integer in [{lo}, {hi}], got {v!r}")
        empty = [j for j, n in enumerate(self.level_sizes()) if n == 0]
        if empty:
            raise ValueError(
                f"prompts: {self.prompts} leave level(s) {empty} of level_mix {self.level_mix!r} without a "
                "prompt (each level's accuracy would read 0): more prompts or a flatter mix"
            )
        floats = {
            "start_jitter": (0, 10),
            "level_length_growth": (0, 10),
            "run_on_right": (0, 1),
            "run_on_wrong": (0, 1),
            "sharing": (0, 1),
            "lr": (0, 100),
            "grad_clip": (0, 1e9),
        }
        for name, (lo, hi) in floats.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name}: a number in [{lo}, {hi}], got {v!r}")
        if not 0 < self.run_on_right < 1 or not 0 < self.run_on_wrong < 1:
            raise ValueError(
                f"run_on_right, run_on_wrong: each strictly between 0 and 1, got "
                f"{self.run_on_right}, {self.run_on_wrong}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr: a number > 0, got {self.lr}")
        if self.lengths not in ("learned", "fixed"):
            raise ValueError(f"lengths: 'learned' or 'fixed', got {self.lengths!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: 'adam' or 'sgd', got {self.optimizer!r}")

    def level_sizes(self) -> list[int]:
        """Prompts per level: the pool split by level_mix (largest remainders; `check` refuses a level left empty)."""
        mix = self.mix()
        raw = [self.prompts * m / sum(mix) for m in mix]
        sizes = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - sizes[i], reverse=True)[: self.prompts - sum(sizes)]:
            sizes[i] += 1
        return sizes


class SyntheticPolicy(nn.Module):
    """logits [P, 4] over the answers of every prompt in the pool (see the module docstring)."""

    def __init__(self, cfg: TestbedConfig, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(10_007 * seed + 17)
        sizes = cfg.level_sizes()
        level = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])  # [P]
        p0 = torch.tensor(cfg.level_p0(), dtype=torch.float64)[level]
        right_logit = torch.log(p0 / (1 - p0)) + cfg.start_jitter * torch.randn(
            len(level), generator=gen, dtype=torch.float64
        )
        qr, qw = cfg.run_on_right, cfg.run_on_wrong
        start = torch.stack(
            [
                right_logit + math.log(1 - qr),
                right_logit + math.log(qr),
                torch.full_like(right_logit, math.log(1 - qw)),
                torch.full_like(right_logit, math.log(qw)),
            ],
            1,
        )
        grow = 1 + cfg.level_length_growth * level.double()
        lengths = torch.stack([cfg.len_short * grow, cfg.len_run_on * grow] * 2, 1).round().clamp(min=1).long()
        E = torch.eye(4) if cfg.lengths == "learned" else torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
        self.register_buffer("start", start.float())  # [P, 4]
        self.register_buffer("lengths", lengths)  # [P, 4] tokens of each answer
        self.register_buffer("level", level)  # [P]
        self.register_buffer("E", E)  # [4, d]
        self.sharing = float(cfg.sharing)
        d = E.shape[1]
        self.theta = nn.Parameter(torch.zeros(len(level), d))  # each prompt's own
        self.phi = nn.Parameter(torch.zeros(d))  # shared by every prompt
        self.n_levels = len(sizes)

    def forward(self, prompts: Tensor | None = None) -> Tensor:
        """logits [P, 4] of `prompts` [P] (default: the whole pool)."""
        theta = self.theta if prompts is None else self.theta[prompts]
        start = self.start if prompts is None else self.start[prompts]
        return start + ((1 - self.sharing) * theta + self.sharing * self.phi) @ self.E.T

    @torch.no_grad()
    def accuracy(self) -> tuple[float, list[float]]:
        """The exact expected accuracy of one sampled answer: over the pool, and per level."""
        p_right = torch.softmax(self(), -1)[:, RIGHT].sum(1)  # [P]
        per = torch.zeros(self.n_levels).index_add_(0, self.level, p_right)
        counts = torch.bincount(self.level, minlength=self.n_levels).clamp(min=1)
        return float(p_right.mean()), (per / counts).tolist()

    @torch.no_grad()
    def run_on_shares(self) -> tuple[float, float]:
        """The mean over the pool of the run-on answers' share among the right ones and among the wrong ones."""
        p = torch.softmax(self(), -1)
        return float((p[:, 1] / p[:, :2].sum(1)).mean()), float((p[:, 3] / p[:, 2:].sum(1)).mean())
