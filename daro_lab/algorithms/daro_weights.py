"""DARO's learnable per-pass-rate weights: one per interior k = 1..K-1 (docs/math.md).

    w = exp(s)   (param='log', s learnable, init ln(init))   or   w learnable   (param='direct')

Each weight is its own scalar parameter, so that a group absent from a mini-batch, whose gradient
`release_absent` sets to None, is skipped by AdamW entirely (no step, no moment update). After
every optimizer step `project_` clamps the weights to [w_min, w_max] and reports which sit on a
bound: with the signed signal and L_mu <= 0 the w-gradient L_mu - 1/w never vanishes and the
weight runs to w_max instead of overflowing.

The module also keeps the state of the signal reading (`DaroState`: the per-group EMA of the signal,
`LossSettings.signal_ema`, and the running mean behind `reg='auto'`) as buffers, so it is saved and
restored with the weights. The loss reads it and returns the next one; `set_state` keeps it after the step.

Usage in a training loop:

    weights = DaroWeights(K=8)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-6},
                             weights.param_group(lr=1e-3)])
    t = loss_terms("daro", batch, K=8, settings, weights=weights(), daro_state=weights.state())
    t.loss.backward(); weights.release_absent(t.metrics); opt.step(); weights.project_()
    weights.set_state(t.daro_state)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from daro_lab.algorithms.losses import DaroState, group_keys
from daro_lab.record import mu_key


class DaroWeights(nn.Module):
    def __init__(
        self,
        K: int,
        param: str = "log",
        init: float = 1.0,
        w_min: float = 1e-3,
        w_max: float = 1e3,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if K < 2:
            raise ValueError(f"K = {K}: DARO needs K >= 2 (one weight per interior pass rate, K-1 of them)")
        if param not in ("log", "direct"):
            raise ValueError(f"param must be 'log' or 'direct', got {param!r}")
        if not 0 < w_min <= init <= w_max:
            raise ValueError(f"need 0 < w_min <= init <= w_max, got {w_min}, {init}, {w_max}")
        self.K, self.param, self.w_min, self.w_max = K, param, w_min, w_max
        s0 = math.log(init) if param == "log" else init
        self.raw = nn.ParameterList(nn.Parameter(torch.tensor(s0, dtype=dtype)) for _ in range(K - 1))
        for name, value in DaroState.fresh(K)._asdict().items():
            self.register_buffer(name, value)

    def state(self) -> DaroState:
        """The signal reading's state before the next update (see LossSettings.signal_ema and reg)."""
        return DaroState(*(getattr(self, name).clone() for name in DaroState._fields))

    @torch.no_grad()
    def set_state(self, state: DaroState | None) -> None:
        """Keep the state a loss returned (`LossTerms.daro_state`) for the next update."""
        if state is None:
            return
        for name, value in state._asdict().items():
            getattr(self, name).copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the signal state existed: keep a fresh state
        for name in DaroState._fields:
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> Tensor:
        """[K-1] the weights w_k for k = 1..K-1."""
        s = torch.stack(list(self.raw))
        return torch.exp(s) if self.param == "log" else s

    def param_group(self, lr: float) -> dict:
        """The AdamW parameter group of the weights: own learning rate, no weight decay."""
        return {"params": list(self.raw), "lr": lr, "weight_decay": 0.0, "name": "daro_weights"}

    def release_absent(self, present: dict[str, float] | Tensor) -> None:
        """Drop the gradient of every group absent from the mini-batch so the optimizer skips it.

        `present` is the loss's metrics dict (groups with a 'loss/mu_kofK' key are present) or a
        [K-1] bool tensor.
        """
        if isinstance(present, dict):
            ks = set(group_keys(present, "loss"))
            flags = [k in ks for k in range(1, self.K)]
        else:
            flags = present.tolist()
        for p, on in zip(self.raw, flags):
            if not on:
                p.grad = None

    @torch.no_grad()
    def project_(self) -> dict[str, float]:
        """Clamp to [w_min, w_max] after an optimizer step; {'daro/at_bound': weights on a bound}. The weights
        after the step are `metrics()`."""
        lo, hi = (math.log(self.w_min), math.log(self.w_max)) if self.param == "log" else (self.w_min, self.w_max)
        hits = 0
        for p in self.raw:
            v = float(p)
            if not math.isfinite(v):
                raise FloatingPointError(f"DARO weight parameter became {v}: lower algo.daro.lr_w")
            if v <= lo or v >= hi:
                hits += 1
            p.clamp_(lo, hi)
        return {"daro/at_bound": float(hits)}

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        return {f"daro/weight/{mu_key(k, self.K)}": v for k, v in self.as_dict().items()}

    @torch.no_grad()
    def as_dict(self) -> dict[int, float]:
        """{k: w_k} for k = 1..K-1."""
        return {k: float(w) for k, w in enumerate(self().tolist(), start=1)}

    @torch.no_grad()
    def load_values(self, values: dict[int, float]) -> None:
        """Set the weights from {k: w}, e.g. the final weights of a finished run ('optimal static')."""
        missing = [k for k in range(1, self.K) if k not in values]
        if missing:
            raise ValueError(f"weights for k = {missing} missing (K = {self.K} needs k = 1..{self.K - 1})")
        for k, p in enumerate(self.raw, start=1):
            w = float(values[k])
            if not self.w_min <= w <= self.w_max:
                raise ValueError(f"weight for k = {k} is {w}, outside [{self.w_min}, {self.w_max}]")
            p.fill_(math.log(w) if self.param == "log" else w)
