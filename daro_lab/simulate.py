"""A deterministic loss-scale simulator that needs no model: "what would the loss scale be on my run?"

Synthetic mini-batches with the lengths you give (of right and of wrong answers, per pass rate) go through
the real loss (`algorithms.loss_terms`) for every method; DARO's weights are stepped by the real AdamW for
`updates` updates under each reading of its signal. Nothing is learned by a model: the policy is replaced by
per-token log-ratios drawn around 0 (`ratio_noise`), so the only thing that moves is the weights.

    from daro_lab.simulate import SimConfig, simulate
    res = simulate(SimConfig(len_correct=400, len_wrong=600, updates=600))
    res.groups      # one row per (method or reading, update, k): the per_mu quantities (daro_lab.record)
    res.summary()   # per method: S share per prompt vs the equal-length and length-corrected shapes;
                    # per reading: final weights, max/min, distance from the fixed point

One mini-batch: `prompts` prompts, each at a pass rate k/K drawn from `mu_weights` (default uniform over the
interior k), with k right answers of length ~ len_correct[k] and K - k wrong ones of length ~ len_wrong[k]
(log-normal jitter of coefficient of variation `len_cv`, at least one token, at most `max_len`).
Same config, same numbers.

Speed: with ratio_noise = 0 every token of a response has rho = 1 and the same loss, so each response is one
column whose mask holds its length (the loss uses the mask only as a per-token weight: token counts, sums
and coefficients come out the same; `tests/test_simulate.py` checks this against one column per token).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from daro_lab.algorithms import (
    METHODS,
    DaroWeights,
    LossSettings,
    PolicyBatch,
    compute_advantages,
    loss_terms,
    shaped_methods,
)
from daro_lab.record import per_mu_rows

BASELINES = tuple(shaped_methods())  # the methods with a static shape
DEFAULT_READINGS = ("abs:1", "signed:1", "mass:1", "abs:auto", "mass:auto")


@dataclass
class SimConfig:
    """The synthetic run: lengths per pass rate, batch shape, DARO's optimizer and readings."""

    len_correct: float | list[float] = 400.0  # mean length of a right answer: one value, or K-1 values (k = 1..K-1)
    len_wrong: float | list[float] = 600.0  # mean length of a wrong answer: one value, or K-1 values
    K: int = 8  # responses per prompt (paper: 8)
    prompts: int = 64  # prompts per mini-batch (paper: mini-batch 64)
    updates: int = 600  # optimizer updates (paper: 300 steps x 2 mini-batches)
    mu_weights: list[float] | None = None  # relative frequency of k = 1..K-1 among the prompts (None: uniform)
    len_cv: float = 0.2  # coefficient of variation of each response's length around its mean
    max_len: int = 4096  # longest response (tokens)
    ratio_noise: float = 0.0  # std of the per-token log-ratio log pi - log pi_old (0: on-policy, rho = 1)
    lr_w: float = 1e-3  # DARO weights' learning rate (paper: 1e-3)
    readings: list[str] = field(default_factory=lambda: list(DEFAULT_READINGS))  # 'signal:reg[:ema]' per DARO run
    methods: list[str] = field(default_factory=lambda: list(BASELINES))  # baselines to simulate
    std: str = "unbiased"  # group std of the advantage
    eps_low: float = 0.2
    eps_high: float = 0.28
    seed: int = 0

    # the largest batch shape the simulator takes: beyond it a run needs gigabytes and says nothing useful (no RLVR
    # setup samples more than a few hundred responses per prompt)
    MAX_K = 1024
    MAX_PROMPTS = 16384
    MAX_UPDATES = 1_000_000

    def lengths(self, which: str) -> list[float]:
        """[K-1] mean lengths for k = 1..K-1 of 'correct' or 'wrong' answers."""
        v = self.len_correct if which == "correct" else self.len_wrong
        opt = f"--len-{which} (len_{which})"
        vals = [float(v)] * (self.K - 1) if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) != self.K - 1:
            raise ValueError(
                f"{opt}: expected one value or K-1 = {self.K - 1} values (k = 1..{self.K - 1}), got {len(vals)}"
            )
        bad = [x for x in vals if not 1 <= x <= self.max_len]
        if bad:
            raise ValueError(
                f"{opt}: mean lengths must be between 1 and max_len = {self.max_len} tokens, got {bad[0]!r}"
            )
        return vals

    def check(self) -> None:
        """ValueError naming the option (and field) of the first value the simulator cannot use."""

        def need(ok: bool, opt: str, what: str, value) -> None:
            if not ok:
                raise ValueError(f"{opt}: {what}, got {value!r}")

        def finite(x) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        need(
            isinstance(self.K, int) and 2 <= self.K <= self.MAX_K,
            "--k (K)",
            f"an integer in [2, {self.MAX_K}] (a pass rate strictly between 0 and 1 needs K >= 2; memory grows with K)",
            self.K,
        )
        need(
            isinstance(self.prompts, int) and 1 <= self.prompts <= self.MAX_PROMPTS,
            "--prompts (prompts)",
            f"an integer in [1, {self.MAX_PROMPTS}]",
            self.prompts,
        )
        need(
            isinstance(self.updates, int) and 1 <= self.updates <= self.MAX_UPDATES,
            "--updates (updates)",
            f"an integer in [1, {self.MAX_UPDATES}]",
            self.updates,
        )
        need(isinstance(self.max_len, int) and self.max_len >= 1, "max_len", "an integer >= 1", self.max_len)
        need(finite(self.lr_w) and self.lr_w > 0, "--lr-w (lr_w)", "a finite number > 0", self.lr_w)
        need(
            finite(self.len_cv) and 0 <= self.len_cv <= 10,
            "--len-cv (len_cv)",
            "a finite number in [0, 10] (a coefficient of variation)",
            self.len_cv,
        )
        need(
            finite(self.ratio_noise) and 0 <= self.ratio_noise <= 10,
            "--ratio-noise (ratio_noise)",
            "a finite number in [0, 10] (the std of a per-token log-ratio; 0: on-policy)",
            self.ratio_noise,
        )
        need(finite(self.eps_low) and 0 <= self.eps_low < 1, "eps_low", "a finite number in [0, 1)", self.eps_low)
        need(finite(self.eps_high) and self.eps_high >= 0, "eps_high", "a finite number >= 0", self.eps_high)
        if self.mu_weights is not None:
            mw = list(self.mu_weights)
            need(
                len(mw) == self.K - 1 and all(finite(x) and x >= 0 for x in mw) and sum(mw) > 0,
                "--mu-weights (mu_weights)",
                f"K-1 = {self.K - 1} finite non-negative numbers, not all 0",
                mw,
            )
        self.lengths("correct"), self.lengths("wrong")


@dataclass(frozen=True)
class Reading:
    """One DARO run of the simulator: the signal, the regulariser constant and the signal's EMA."""

    signal: str
    reg: float | str
    ema: float = 0.0

    @property
    def name(self) -> str:
        reg = self.reg if isinstance(self.reg, str) else f"{self.reg:g}"
        return f"daro[{self.signal}, C={reg}" + (f", ema={self.ema:g}]" if self.ema else "]")

    @staticmethod
    def parse(text: str) -> Reading:
        """'mass:auto', 'abs:1', 'abs:0.1:0.9' -> Reading; ValueError naming the bad part."""
        from daro_lab.algorithms import SIGNALS

        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or parts[0] not in SIGNALS:
            raise ValueError(f"reading {text!r}: expected 'signal[:reg[:ema]]' with signal one of {', '.join(SIGNALS)}")
        reg: float | str = 1.0
        if len(parts) > 1:
            try:
                reg = "auto" if parts[1] == "auto" else float(parts[1])
            except ValueError:
                raise ValueError(f"reading {text!r}: reg must be a number > 0 or 'auto', got {parts[1]!r}") from None
            if reg != "auto" and not (math.isfinite(reg) and reg > 0):
                raise ValueError(f"reading {text!r}: reg must be a number > 0 or 'auto', got {parts[1]!r}")
        ema = 0.0
        if len(parts) > 2:
            try:
                ema = float(parts[2])
            except ValueError:
                raise ValueError(f"reading {text!r}: ema must be a number in [0, 1), got {parts[2]!r}") from None
            if not 0 <= ema < 1:
                raise ValueError(f"reading {text!r}: ema must be a number in [0, 1), got {parts[2]!r}")
        return Reading(parts[0], reg, ema)


def _batch(cfg: SimConfig, gen: torch.Generator, adv_kind: str, compact: bool = True) -> PolicyBatch:
    """One synthetic mini-batch with the method's advantages (compact: one weighted column per response when
    every token is alike)."""
    K, P = cfg.K, cfg.prompts
    w = torch.tensor(cfg.mu_weights if cfg.mu_weights is not None else [1.0] * (K - 1), dtype=torch.float64)
    k = torch.multinomial(w, P, replacement=True, generator=gen) + 1  # [P] in 1..K-1
    rewards = (torch.arange(K)[None, :] < k[:, None]).double()  # [P, K]: k right answers first
    lc = torch.tensor(cfg.lengths("correct"), dtype=torch.float64)[k - 1]  # [P]
    lw = torch.tensor(cfg.lengths("wrong"), dtype=torch.float64)[k - 1]
    mean = torch.where(rewards > 0.5, lc[:, None], lw[:, None]).flatten()  # [P*K]
    sd = math.sqrt(math.log1p(cfg.len_cv**2))
    jitter = torch.exp(torch.randn(P * K, generator=gen, dtype=torch.float64) * sd - sd * sd / 2)
    lengths = (mean * jitter).round().clamp(1, cfg.max_len).long()
    if cfg.ratio_noise > 0 or not compact:
        T = int(lengths.max())
        mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    else:  # every token of a response is alike (rho = 1): one column, weighted by the length (see module doc)
        T, mask = 1, lengths.double()[:, None]
    old = torch.zeros(P * K, T, dtype=torch.float64)
    logp = old + cfg.ratio_noise * torch.randn(P * K, T, generator=gen, dtype=torch.float64)
    adv = compute_advantages(rewards, adv_kind, cfg.std)
    return PolicyBatch(
        logp=logp,
        old_logp=old,
        mask=mask,
        advantages=adv.flatten(),
        num_correct=k.repeat_interleave(K),
        rewards=rewards.flatten(),
        prompt_index=torch.arange(P).repeat_interleave(K),
    )


def _group_rows(metrics: dict, K: int, run: str, update: int) -> list[dict]:
    """per_mu rows (the record's vocabulary) of one update, labelled with the run and the update."""
    return [{"run": run, "update": update, **row} for row in per_mu_rows(metrics, K)]


def _grad_norms(batch: PolicyBatch, K: int, s: LossSettings, w: torch.Tensor) -> torch.Tensor:
    """[K-1] ||grad L_mu|| with respect to the per-token log-probs (the simulator's stand-in for theta)."""
    logp = batch.logp.detach().clone().requires_grad_()
    b = PolicyBatch(**{**batch.__dict__, "logp": logp})
    t = loss_terms("daro", b, K, s, weights=w.detach(), group_grad_norms=torch.zeros(K - 1, dtype=logp.dtype))
    out = torch.zeros(K - 1, dtype=logp.dtype)
    for kk in range(1, K):
        if t.present[kk]:
            (g,) = torch.autograd.grad(t.group_loss[kk], logp, retain_graph=True)
            out[kk - 1] = g.norm()
    return out


@dataclass
class SimResult:
    config: SimConfig
    groups: pd.DataFrame  # one row per (run, update, k): the per_mu quantities of daro_lab.record

    def summary(self, last: float = 0.1) -> pd.DataFrame:
        """Per run (method or reading) and k: window means over the last `last` share of the updates.

        Baselines: S share per prompt (measured), the equal-length shape and the length-corrected shape
        (both as shares over the k present); |C| share: each group's sum of |C| over the window over the sum
        over groups (pooled, so that a near-zero mini-batch weighs nothing), of the coefficient part only
        (DARO's offset -C ln w has no theta-gradient), NaN where the loss is 0 up to rounding (GRPO at rho = 1:
        its advantages sum to 0 within each group); DARO readings: final w, mean w*signal/C over the window."""
        from daro_lab.algorithms import length_corrected_shape

        cfg, g = self.config, self.groups
        start = int(cfg.updates * (1 - last))
        win = g[g["update"] >= start]
        rows = []
        lc, lw = cfg.lengths("correct"), cfg.lengths("wrong")
        for run, d in win.groupby("run", sort=False):
            per_k = d.groupby("k")
            s_pp = (d.scale / d.prompts).groupby(d.k).mean()
            out = pd.DataFrame({"run": run, "k": list(per_k.groups), "K": cfg.K})
            out["mu"] = out.k / cfg.K
            out["S_share"] = out.k.map(s_pp / s_pp.sum())
            coef = (d.contrib - d.contrib_offset.fillna(0.0) if "contrib_offset" in d else d.contrib).abs()
            c_sum = coef.groupby(d.k).sum()
            exact_zero = c_sum.sum() <= 1e-9 * (d.scale.abs().sum() or 1.0)
            out["C_abs_share"] = np.nan if exact_zero else out.k.map(c_sum / c_sum.sum())
            out["L"] = out.k.map(per_k["loss"].mean())
            out["mass"] = out.k.map(per_k["mass"].mean())
            method = run if run in METHODS else "daro"
            if method in BASELINES:
                eq = [length_corrected_shape(method, k, cfg.K, 1.0, 1.0, cfg.std) for k in out.k]
                lcs = [length_corrected_shape(method, k, cfg.K, lc[k - 1], lw[k - 1], cfg.std) for k in out.k]
                out["equal_length_share"] = [x / sum(eq) for x in eq]
                out["length_corrected_share"] = [x / sum(lcs) for x in lcs]
            if "daro/weight_used" in d:
                # each group's weight at its last update in the window (a group absent from the very last mini-batch
                # keeps the weight it had: absent groups are not stepped)
                out["w_final"] = out.k.map(d.sort_values("update").groupby("k")["daro/weight_used"].last())
                out["wS"] = out.k.map(per_k["daro/wS"].mean())  # window means of the record's daro/wS, daro/signal
                out["signal"] = out.k.map(per_k["daro/signal"].mean())
                out["reg"] = float(d.reg.iloc[-1])
            rows.append(out)
        return pd.concat(rows, ignore_index=True)


def simulate(cfg: SimConfig, compact: bool = True, progress: bool = False) -> SimResult:
    """Run every baseline for one mini-batch per update (their loss scale needs no optimizer) and every DARO
    reading for `updates` AdamW steps of its weights; all on the same synthetic mini-batches. Bad config:
    ValueError naming the option (`SimConfig.check`). progress: a bar on stderr."""
    cfg.check()
    K = cfg.K
    readings = [Reading.parse(r) for r in cfg.readings]
    for m in cfg.methods:
        if m not in BASELINES:
            raise ValueError(f"method {m!r}: the simulator runs the baselines {', '.join(BASELINES)} (DARO: readings)")
    rows: list[dict] = []
    base = LossSettings.read("sim", lambda name: getattr(cfg, name))
    darow = []
    for r in readings:
        dw = DaroWeights(K, dtype=torch.float64)
        opt = torch.optim.AdamW(dw.param_group(cfg.lr_w)["params"], lr=cfg.lr_w, weight_decay=0.0)
        s = dataclasses.replace(base, weight_signal=r.signal, reg=r.reg, signal_ema=r.ema)  # the reading's DARO
        darow.append((r, dw, opt, s))
    baselines_every = max(1, cfg.updates // 100)  # their shapes do not depend on the update: sample 100 of them
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.updates, desc="simulate", unit="update", file=sys.stderr, dynamic_ncols=True)
    for u in range(cfg.updates):
        if bar is not None:
            bar.update(1)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + u)
        batches = {}
        for m in dict.fromkeys([METHODS[m].advantage for m in cfg.methods] + ["group_std"]):
            batches[m] = _batch(cfg, torch.Generator().manual_seed(gen.initial_seed()), m, compact)
        if u % baselines_every == 0:
            for m in cfg.methods:
                t = loss_terms(m, batches[METHODS[m].advantage], K, base)
                rows += _group_rows(t.metrics, K, m, u)
        b = batches["group_std"]
        for r, dw, opt, s in darow:
            norms = _grad_norms(b, K, s, dw()) if r.signal == "grad" else None
            opt.zero_grad()
            t = loss_terms("daro", b, K, s, weights=dw(), group_grad_norms=norms, daro_state=dw.state())
            t.loss.backward()
            dw.release_absent(t.metrics)
            opt.step()
            dw.project_()
            dw.set_state(t.daro_state)
            rows += _group_rows(t.metrics, K, r.name, u)
    if bar is not None:
        bar.close()
    return SimResult(cfg, pd.DataFrame(rows))


def reach_limit(lr_w: float, updates: int) -> float:
    """The largest |ln w| AdamW can reach: each update moves ln w by at most about lr_w (Adam's step is
    bounded by its learning rate), so |ln w*| <~ lr_w x updates decides whether a fixed point is reachable."""
    return lr_w * updates
