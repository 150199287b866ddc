"""DARO as a loss, and daro-lab's per-pass-rate metrics, for TRL's GRPOTrainer (`pip install -e ".[trl]"`).

    from daro_lab.integrations.trl import DaroGRPOConfig, DaroGRPOTrainer

    args = DaroGRPOConfig(output_dir="out", loss_type="dapo", num_generations=8, report_to=["mlflow"])
    trainer = DaroGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()          # TRL's own loss, plus loss/mu_3of8, contrib/, scale/, ... in TRL's logs

    args = DaroGRPOConfig(output_dir="out", loss_type="daro", daro_lr_w=1e-3, daro_signal="abs", daro_reg="1")

`DaroGRPOTrainer` is TRL's `GRPOTrainer` with three additions, none of which changes TRL's own loss types:

1. **Per-pass-rate metrics** (`per_mu_metrics`, on by default). For every optimizer update the trainer builds
   daro-lab's `PolicyBatch` from TRL's own tensors (completion mask (x tool mask), TRL's advantages, the new and
   old per-token log-probs TRL computed, the reference log-probs when beta > 0) plus what TRL does not keep: each
   completion's right/wrong and its prompt's k (right answers among the prompt's `num_generations`, counted over
   every process's completions). Right is read from the reward (the weighted sum of the reward functions) by
   `right_answer`: 0/1 rewards as they are; any other reward (reward models, length or format rewards, binary
   functions under `reward_weights`) above its prompt's mean reward, i.e. the completions TRL's advantage pushes
   up, so the record covers every prompt TRL trains on (the switch is said once on stderr and in the MLflow tag
   `daro_lab.right_answer`); or above `pass_threshold` when set. Nothing of this changes TRL's training.
   `algorithms.loss_terms` with daro-lab's method of the same name (grpo -> grpo, dapo -> dapo,
   dr_grpo -> dr_grpo with L_max = `max_completion_length`; bnpo -> dapo; TRL's other loss types are accounted
   as dapo, their per-token losses are not the clipped surrogate) gives the metrics under daro-lab's keys
   (`loss/mu_3of8`, `contrib/`, `scale/`, `prompts/`, `tokens/`, `len_correct/`, `len_incorrect/`,
   `clipfrac_pos/`, `clipfrac_neg/`, `mass/`, `batch/...`), appended to TRL's `_metrics`, so they reach every
   `report_to`. They equal `policy_loss(method, batch)` on that update's batch (tests/test_integrations_trl.py).
   The rows also go to a `per_mu` table (`<output_dir>/tables/per_mu.parquet`, and the MLflow artifact
   `tables/per_mu.parquet` with daro-lab's params and tags when `report_to` includes mlflow; TRL's `grad_norm` is
   also logged as `grad/norm`), so `daro-lab plot` / `daro-lab report` read the run like one of daro-lab's (the
   figures that need daro-lab's held-out evaluation or off-policy Hoeffding table say what is missing).

2. **TRL's own normalisers**, next to daro-lab's: `trl/contrib/mu_kofK` and `trl/scale/mu_kofK` are C_mu and S_mu
   with TRL's aggregation coefficient, and `trl/loss` their sum over all completions (mu in {0, 1} included),
   which is TRL's loss of the update (sum of its micro-batch losses). Where they differ from daro-lab's, per update
   of B rows per micro-batch, G = gradient accumulation steps, P processes, s = steps_per_generation:

   - daro-lab drops the prompts with mu in {0, 1} before every normaliser; TRL keeps their completions in the
     batch (advantage 0, so they add nothing to the loss when beta = 0, but they count in the normalisers);
   - grpo: TRL averages the per-completion token-means over all B x G rows, daro-lab over the n kept ones:
     trl/contrib = contrib x n / (B G);
   - dr_grpo: TRL divides by B x G x max_completion_length, daro-lab by n x max_completion_length: the same n / (B G);
   - dapo: TRL divides each process's sum by `num_items_in_batch` / P x G / s, where num_items_in_batch is the token
     count of the whole generation batch over all processes (mu in {0, 1} included), and DDP averages over the P
     processes; daro-lab divides by the kept tokens of the update over all processes, T_kept:
     trl/contrib = contrib x T_kept s / (num_items G) (one factor per update, so the shares over mu agree);
   - bnpo: TRL's token-mean is per micro-batch: a common factor only when G = 1;
   - advantages: TRL's (r - mean) / (std + 1e-4), unbiased std, over the group ('batch' scaling: over every reward
     of the generation batch, mu in {0, 1} included); daro-lab's estimators use eps 1e-6 and lipo's batch std over
     the kept prompts only. The metrics use TRL's advantages as TRL computed them.
   The trl/ metrics are written only where TRL's per-token loss is daro-lab's clipped surrogate (loss types grpo,
   bnpo, dr_grpo, dapo; token-level importance sampling; no entropy mask, off-policy mask or vLLM
   importance-sampling correction).

3. **DARO as a loss** (`loss_type="daro"`): daro-lab's `loss_terms("daro", ...)` on daro-lab's group-std advantages
   (recomputed from the right/wrong of each completion, by the same `right_answer`; TRL's `scale_rewards` does not
   apply), with DARO's K-1 weights (`DaroWeights`) in their own optimizer parameter group (lr `daro_lr_w`, no weight
   decay, no learning rate schedule, not in gradient clipping), every reading daro-lab has (`daro_signal` abs |
   signed | mass | grad, `daro_reg` a number or 'auto', `daro_signal_ema`), the weights of groups absent from an
   update not stepped, clamped to [w_min, w_max] after each step, and saved with TRL's checkpoints (`daro_weights.pt`
   in the checkpoint folder: weights and signal state; the optimizer state holds their AdamW moments) and restored by
   `train(resume_from_checkpoint=...)`. One optimizer update is daro-lab's mini-batch, run by the trainer's own
   update unit (`daro_lab.trainer.update.backward_minibatch` with `TRLRuntime`) at the update's last micro-batch,
   over all of its micro-batches: with gradient accumulation the update's totals (`Totals`: tokens per group, L_mu,
   ...) come from a no-grad forward of its micro-batches first and each micro-batch's backward is its exact share of
   the whole update's loss, as in daro-lab's trainer ('grad' signal included). HF's loop backpropagates a zero for
   each micro-batch (the unit has done the update's backward) and logs the update's loss. Needs steps_per_generation
   to be a multiple of gradient_accumulation_steps (an update within one generation batch); no router auxiliary loss.

Several processes (accelerate / torchrun): the totals and metric sums are all-reduced over a `Shard`, as daro-lab's
trainer does; this path follows daro-lab's data-parallel accounting but is not exercised by the tests here (one
CPU process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

try:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError('daro_lab.integrations.trl needs TRL: pip install -e ".[trl]"') from _e

from daro_lab.algorithms import (
    METHODS,
    SIGNALS,
    DaroWeights,
    LossSettings,
    MetricSums,
    PolicyBatch,
    Shard,
    Totals,
    batch_totals,
    clipped_surrogate,
    compute_advantages,
    group_keys,
    kl_k3,
    loss_terms,
)
from daro_lab.hooks.builtin import per_mu_rows
from daro_lab.record import (
    GRAD_NORM,
    LOSS_TOTAL,
    TAG_ARM_LABEL,
    TAG_METHOD,
    TAG_RIGHT_ANSWER,
    TAG_SEED,
    TAG_SOURCE,
    mu_key,
)
from daro_lab.trainer.update import MinibatchResult, backward_minibatch, cat_batches, flat_grad

# TRL loss type -> daro-lab method of the per-pass-rate accounting
METHOD_OF_LOSS_TYPE = {"grpo": "grpo", "dapo": "dapo", "dr_grpo": "dr_grpo", "bnpo": "dapo", "daro": "daro"}
# TRL loss types whose per-token loss is daro-lab's clipped surrogate (so TRL's C_mu and S_mu can be written)
SURROGATE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TRL_ADV_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
WEIGHTS_FILE = "daro_weights.pt"
RIGHT_ANSWERS = ("auto", "above_mean", "binary")  # DaroGRPOConfig.right_answer
TABLES_DIR = "tables"
# keyword arguments of GRPOTrainer._get_per_token_logps_and_entropies taken from the inputs, as TRL's _compute_loss
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class DaroGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig, plus daro-lab's instrumentation and DARO (`loss_type="daro"`)."""

    per_mu_metrics: bool = field(
        default=True,
        metadata={
            "help": "Record daro-lab's per-pass-rate metrics (loss/mu_kofK, contrib/, scale/, ...) and the per_mu table."
        },
    )
    pass_threshold: float | None = field(
        default=None,
        metadata={
            "help": "A completion counts as right when its reward (weighted sum over the reward functions) exceeds this; "
            "None: `right_answer` decides."
        },
    )
    right_answer: str = field(
        default="auto",
        metadata={
            "help": "Which completions count as right for the per-pass-rate record and DARO's pass rates, when "
            "pass_threshold is None: 'auto' (rewards that are all 0 or 1 as they are; the first other reward switches "
            "the run to 'above_mean', said once on stderr and in the MLflow tag daro_lab.right_answer); 'above_mean' "
            "(reward above its prompt's mean: the completions GRPO's advantage (r - mean)/std pushes up, so k > 0 "
            "exactly where TRL's advantages are not all 0; a prompt whose rewards are all equal counts as mu = 0); "
            "'binary' (rewards must be 0 or 1, else an error). daro-lab docs/math.md, section 1 (mu = k/K)."
        },
    )
    daro_lr_w: float = field(default=1e-3, metadata={"help": "DARO: learning rate of the weights (no schedule)."})
    daro_signal: str = field(
        default="abs", metadata={"help": "DARO: what drives the weights: abs, signed, mass or grad."}
    )
    daro_reg: str = field(default="1", metadata={"help": "DARO: the regulariser's constant C, a number > 0 or 'auto'."})
    daro_signal_ema: float = field(
        default=0.0, metadata={"help": "DARO: EMA decay of the per-group signal, in [0, 1)."}
    )
    daro_param: str = field(
        default="log", metadata={"help": "DARO: weight parametrisation, 'log' (w = exp(s)) or 'direct'."}
    )
    daro_init: float = field(default=1.0, metadata={"help": "DARO: initial weight."})
    daro_w_min: float = field(default=1e-3, metadata={"help": "DARO: lower clamp of the weights."})
    daro_w_max: float = field(default=1e3, metadata={"help": "DARO: upper clamp of the weights."})
    daro_arm_label: str | None = field(
        default=None,
        metadata={
            "help": "The arm label daro-lab's analyses show for this run (MLflow tag daro_lab.arm_label); "
            "default '<method> (TRL)'."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.daro_signal not in SIGNALS:
            raise ValueError(f"daro_signal: expected one of {', '.join(SIGNALS)}, got {self.daro_signal!r}")
        parse_reg(self.daro_reg)
        if not 0 <= self.daro_signal_ema < 1:
            raise ValueError(f"daro_signal_ema: expected a number in [0, 1), got {self.daro_signal_ema}")
        if self.daro_param not in ("log", "direct"):
            raise ValueError(f"daro_param: expected 'log' or 'direct', got {self.daro_param!r}")
        if not 0 < self.daro_w_min <= self.daro_init <= self.daro_w_max:
            raise ValueError(
                f"need 0 < daro_w_min <= daro_init <= daro_w_max, got {self.daro_w_min}, "
                f"{self.daro_init}, {self.daro_w_max}"
            )
        self.daro_lr_w = _finite("daro_lr_w", self.daro_lr_w, "a finite number >= 0", lambda v: v >= 0)
        for name in ("daro_init", "daro_w_min", "daro_w_max", "daro_signal_ema"):
            _finite(name, getattr(self, name), "a finite number")
        if self.right_answer not in RIGHT_ANSWERS:
            raise ValueError(f"right_answer: expected one of {', '.join(RIGHT_ANSWERS)}, got {self.right_answer!r}")
        if self.pass_threshold is not None:
            self.pass_threshold = _finite(
                "pass_threshold", self.pass_threshold, "a finite number (a reward above it is right) or None"
            )


def _finite(name: str, value, what: str, ok=lambda v: True) -> float:
    """`value` as a float when it is a finite number that `ok` accepts; ValueError naming `name` otherwise (NaN would
    compare false everywhere: every completion wrong, a loss of 0, a run that trains nothing without a word)."""
    try:
        v = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return v


def parse_reg(text) -> float | str:
    """'auto' -> 'auto'; '1' / 1.0 -> 1.0; ValueError naming daro_reg otherwise."""
    if isinstance(text, str) and text.strip() == "auto":
        return "auto"
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"daro_reg: expected a number > 0 or 'auto', got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"daro_reg: expected a number > 0 or 'auto', got {text!r}")
    return v


def _constant_lr(step: int) -> float:
    return 1.0


def process_shard(num_processes: int) -> Shard:
    """daro-lab's Shard over torch.distributed (one process: the default)."""
    if num_processes <= 1:
        return Shard()
    import torch.distributed as dist

    def reduce(x: Tensor, op: str = "sum") -> Tensor:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return y

    return Shard(num_processes, reduce)


def trl_coefficients(
    loss_type: str,
    mask: Tensor,
    grad_accum: int,
    max_completion_length: int,
    num_items: float | None,
    num_processes: int,
    steps_per_generation: int,
) -> Tensor:
    """[B, T] TRL's aggregation coefficient of one micro-batch (its loss is sum c * l), as GRPOTrainer._compute_loss
    (trl 1.16) normalises: grpo per-completion token-mean over the B rows, bnpo the micro-batch's token-mean,
    dr_grpo B x max_completion_length, dapo num_items_in_batch / P x G / s; each over the G accumulation steps."""
    m = mask.double()
    B, G = m.shape[0], grad_accum
    if loss_type == "grpo":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * B * G)
    if loss_type == "bnpo":
        return m / (m.sum().clamp(min=1) * G)
    if loss_type == "dr_grpo":
        return m / (B * max_completion_length * G)
    if loss_type == "dapo":
        return m * num_processes * steps_per_generation / (max(float(num_items), 1.0) * G)
    raise ValueError(f"no TRL coefficient for loss type {loss_type!r}")


class DaroGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with daro-lab's per-pass-rate metrics and DARO (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self.per_mu_metrics = bool(getattr(a, "per_mu_metrics", True))
        self.pass_threshold = getattr(a, "pass_threshold", None)
        # the notion of a right completion in use: "threshold", "binary" or "above_mean" ('auto' starts as binary)
        self.right_answer = (
            "threshold"
            if self.pass_threshold is not None
            else "binary"
            if getattr(a, "right_answer", "auto") in ("auto", "binary")
            else "above_mean"
        )
        self.is_daro = self.loss_type == "daro"
        self.daro_method = METHOD_OF_LOSS_TYPE.get(self.loss_type, "dapo")
        self.K = self.num_generations
        # each loss setting from its TRL attribute (LossSettings declares which); a stock GRPOConfig lacks the
        # daro_* options: their defaults
        defaults = {f.metadata["trl"]: f.default for f in dataclasses.fields(LossSettings)}
        self.daro_settings = LossSettings.read(
            "trl",
            lambda n: getattr(a, n[5:], defaults[n]) if n.startswith("args.") else getattr(self, n),
        )
        self.daro_shard = process_shard(self.accelerator.num_processes)
        self.trl_terms_exact = (
            self.loss_type in SURROGATE_LOSS_TYPES
            and self.importance_sampling_level == "token"
            and self.top_entropy_quantile >= 1.0
            and self.off_policy_mask_threshold is None
            and not (self.use_vllm and self.vllm_importance_sampling_correction)
        )
        self.daro_weights: DaroWeights | None = None
        if self.is_daro:
            self._check_daro()
            self.daro_weights = DaroWeights(self.K, a.daro_param, a.daro_init, a.daro_w_min, a.daro_w_max)
            self.daro_weights.to(self.accelerator.device)
        elif self.loss_type not in METHOD_OF_LOSS_TYPE and self.per_mu_metrics:
            warnings.warn(
                f"loss_type {self.loss_type!r} has no daro-lab counterpart: its per-mu metrics are daro-lab's "
                "dapo accounting (clipped surrogate, token-mean) of the same batch, not of TRL's loss",
                stacklevel=2,
            )
        self._capture: list | None = None  # per-token log-probs of the running _compute_loss
        self._window: list[dict] = []  # records of the micro-batches of the running optimizer update
        self._rewards_per_func: Tensor | None = None
        self._gen_count = 0
        self._pending_hist: Tensor | None = None
        self._daro_result: MinibatchResult | None = None  # the running update's, until its metrics are recorded
        self._daro_next_state = None  # the signal state after the running update, kept after the optimizer step
        self.per_mu_rows: list[dict] = []  # the per_mu table (daro-lab's columns plus trl/contrib, trl/scale)
        self.mu_hist_rows: list[dict] = []
        self.last_update_batch: PolicyBatch | None = None  # the last update's batch, detached (inspection, tests)
        self._mlflow: tuple[str, str] | None = None  # (tracking uri, run id)
        self.add_callback(_DaroLabCallback(self))

    def train(self, *args, **kwargs):
        """GRPOTrainer.train; a run that stops on an error or an interrupt keeps what it recorded (the per_mu and
        mu_hist tables of the updates that finished) and its MLflow run is marked FAILED (KILLED for Ctrl-C) with
        traceback.txt, not left for MLflow's exit handler to mark FINISHED."""
        try:
            return super().train(*args, **kwargs)
        except BaseException as e:
            self._record_failure(e)
            raise

    def _record_failure(self, exc: BaseException) -> None:
        import traceback

        try:
            self.write_tables()
        except Exception as inner:  # noqa: BLE001 - the original error is the one to raise
            warnings.warn(f"could not write daro-lab's tables after the error: {inner}", stacklevel=2)
        if self._mlflow is None:
            return
        from daro_lab.tracking import RunStore

        uri, run_id = self._mlflow
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            RunStore(uri).mark_ended(run_id, status, text)
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:  # else MLflow's exit handler ends it FINISHED
                mlflow.end_run(status)
        except Exception as inner:  # noqa: BLE001
            warnings.warn(f"could not mark MLflow run {run_id} {status}: {inner}", stacklevel=2)

    # ---------------------------------------------------------------------------------------------------------
    # set-up

    def _check_daro(self) -> None:
        a = self.args
        if not isinstance(a, DaroGRPOConfig):
            raise ValueError(
                f"loss_type='daro' needs a DaroGRPOConfig (daro_lr_w, daro_signal, ...), got {type(a).__name__}"
            )
        bad = []
        if self.importance_sampling_level != "token":
            bad.append(f"importance_sampling_level={self.importance_sampling_level!r} (DARO's loss is token-level)")
        if self.top_entropy_quantile < 1.0:
            bad.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None:
            bad.append(f"off_policy_mask_threshold={self.off_policy_mask_threshold}")
        if self._entropy_bonus_enabled:
            bad.append("entropy_coef / use_adaptive_entropy")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            bad.append("vllm_importance_sampling_correction=True")
        if self.aux_loss_enabled:
            bad.append("a router auxiliary loss (output_router_logits; the update is daro-lab's loss alone)")
        if bad:
            raise ValueError("loss_type='daro' computes daro-lab's loss, which does not implement: " + "; ".join(bad))
        G, s = a.gradient_accumulation_steps, a.steps_per_generation
        if s % G:
            raise ValueError(
                f"loss_type='daro': steps_per_generation ({s}) must be a multiple of "
                f"gradient_accumulation_steps ({G}), so that an optimizer update lies in one generation batch"
            )

    def create_optimizer(self, model=None):
        """TRL's optimizer, plus DARO's weights as their own parameter group (own lr, no weight decay)."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.daro_weights is not None:
            ids = {id(p) for g in opt.param_groups for p in g["params"]}
            if not any(id(p) in ids for p in self.daro_weights.parameters()):
                opt.add_param_group(self.daro_weights.param_group(self.args.daro_lr_w))
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """TRL's schedule for the policy; DARO's weights keep a constant lr, as in daro-lab's trainer."""
        sched = super().create_scheduler(num_training_steps, optimizer)
        opt = optimizer if optimizer is not None else self.optimizer
        idx = [i for i, g in enumerate(opt.param_groups) if g.get("name") == "daro_weights"]
        if idx and hasattr(sched, "lr_lambdas") and len(sched.lr_lambdas) == len(opt.param_groups):
            for i in idx:
                sched.lr_lambdas[i] = _constant_lr
                opt.param_groups[i]["lr"] = sched.base_lrs[i]
        elif idx:
            warnings.warn(
                f"lr scheduler {type(sched).__name__} is not a LambdaLR: it also schedules DARO's weights", stacklevel=2
            )
        return sched

    # ---------------------------------------------------------------------------------------------------------
    # rewards, pass rates, advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = out  # every process's completions (TRL gathers them)
        return out

    def _binary(self, rewards: Tensor, unscorable: Tensor, K: int) -> Tensor:
        """[N] 0/1 right answers from the summed rewards [N] (K completions per prompt, in order), by the notion in
        use (`right_answer`); unscorable completions count as wrong (reward 0)."""
        r = torch.where(unscorable, torch.zeros_like(rewards), torch.nan_to_num(rewards, nan=0.0))
        if self.right_answer == "threshold":
            return (r > float(self.pass_threshold)).float()
        if self.right_answer == "binary":
            bad = ~((r - 0).abs() < 1e-6) & ~((r - 1).abs() < 1e-6)
            if not bad.any():
                return (r > 0.5).float()
            vals = sorted({round(float(v), 6) for v in r[bad].tolist()})[:5]
            if getattr(self.args, "right_answer", "auto") == "binary":
                raise ValueError(
                    f"right_answer='binary' needs rewards in {{0, 1}} (the sum of the reward functions weighted by "
                    f"reward_weights), got {vals}: set pass_threshold (a completion whose reward exceeds it counts "
                    "as right) or right_answer='above_mean' or 'auto'"
                )
            self._switch_to_above_mean(vals)
        grid = r.view(-1, K)  # [prompts, K]
        mean = grid.mean(1, keepdim=True)
        tol = 1e-6 * mean.abs().clamp(min=1.0)  # equal rewards stay equal up to float rounding of the mean
        return (grid - mean > tol).float().flatten()

    def _switch_to_above_mean(self, vals: list[float]) -> None:
        """right_answer='auto' meets a reward other than 0 or 1: above its prompt's mean from now on, said once."""
        self.right_answer = "above_mean"
        msg = (
            f"daro-lab: rewards are not all 0 or 1 (e.g. {vals}): from now on a completion counts as right when its "
            "reward is above its prompt's mean reward (right_answer='auto' -> 'above_mean'; set pass_threshold or "
            "right_answer to choose)"
        )
        warnings.warn(msg, stacklevel=3)
        print(msg, file=sys.stderr)
        if self._mlflow is not None and self.accelerator.is_main_process:
            from daro_lab.tracking import RunStore

            RunStore(self._mlflow[0]).set_tags(self._mlflow[1], {TAG_RIGHT_ANSWER: "above_mean (auto)"})

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        training = self.model.training
        if not (self.is_daro or (training and self.per_mu_metrics)):
            return out
        rpf = self._rewards_per_func
        K = self.K if training else self.num_generations_eval
        if K != self.K:
            raise ValueError(
                f"loss_type='daro' evaluates with num_generations_eval = num_generations ({self.K}), "
                f"got {K}: DARO has one weight per pass rate k/{self.K}"
            )
        rewards = (rpf * self.reward_weights.to(rpf.device)[None, :]).nansum(dim=1)
        correct = self._binary(rewards, torch.isnan(rpf).all(dim=1), K)  # [N over all processes]
        N = correct.shape[0]
        grid = correct.view(-1, K)
        k_prompt = grid.sum(1).round().long()  # [prompts]
        n_local = out["completion_ids"].shape[0]
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        dev = out["completion_ids"].device
        out["daro_reward"] = correct[local].to(dev)
        out["daro_k"] = k_prompt.repeat_interleave(K)[local].to(dev)
        # prompt ids unique over generation batches (an update may span two when steps_per_generation < G)
        out["daro_prompt"] = (torch.arange(N) // K + self._gen_count * (N // K))[local].to(dev)
        if self.is_daro:  # daro-lab's advantage of the method (group std, eps 1e-6), over the whole generation batch
            adv = compute_advantages(grid.double(), "group_std").flatten()[local]
            out["advantages"] = adv.to(device=dev, dtype=out["advantages"].dtype)
        if training:
            self._gen_count += 1
            hist = torch.bincount(k_prompt.cpu(), minlength=K + 1)
            self._pending_hist = hist if self._pending_hist is None else self._pending_hist + hist
        return out

    # ---------------------------------------------------------------------------------------------------------
    # the loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture is not None:
            self._capture.append(out)
        return out

    def _forward(self, model, inputs, entropy: bool = False):
        """(per-token log-probs, entropies, aux loss) of the completions, as TRL's _compute_loss computes them."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return self._get_per_token_logps_and_entropies(
            model,
            ids,
            attn,
            inputs["completion_ids"].size(1),
            compute_entropy=entropy,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )

    @staticmethod
    def _loss_mask(inputs) -> Tensor:
        m = inputs["completion_mask"]
        return m * inputs["tool_mask"] if "tool_mask" in inputs else m

    def policy_batch(self, inputs, logp: Tensor) -> PolicyBatch:
        """daro-lab's view of one TRL micro-batch, with its per-token log-probs `logp` [B, T]."""
        adv = inputs["advantages"]
        if adv.dim() != 1:
            raise ValueError(f"daro-lab needs one advantage per completion, TRL's batch has shape {tuple(adv.shape)}")
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        logp = logp.float()
        return PolicyBatch(
            logp=logp,
            old_logp=logp.detach() if old is None else old.float(),
            mask=self._loss_mask(inputs).float(),
            advantages=adv.float(),
            num_correct=inputs["daro_k"].long(),
            rewards=inputs["daro_reward"].float(),
            prompt_index=inputs["daro_prompt"].long(),
            ref_logp=None if ref is None else ref.float(),
        )

    def _compute_loss(self, model, inputs):
        if self.is_daro:
            return self._daro_loss(model, inputs)
        if not (self.model.training and self.per_mu_metrics):
            return super()._compute_loss(model, inputs)
        self._capture = []
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            captured, self._capture = self._capture, None
        try:
            b = self.policy_batch(inputs, captured[0][0].detach())
        except (ValueError, KeyError) as e:  # a batch the record cannot read: TRL's training goes on without it
            self._stop_per_mu(f"{type(e).__name__}: {e}")
            return loss
        self._window.append(
            {"batch": b, "num_items": float(inputs["num_items_in_batch"]), "trl_loss": float(loss.detach())}
        )
        return loss

    def _stop_per_mu(self, reason: str) -> None:
        """The per-pass-rate record cannot be made of this run's batches: stop recording (said once), never stop TRL."""
        msg = f"daro-lab: the per-pass-rate record stops here, TRL's training goes on: {reason}"
        warnings.warn(msg, stacklevel=3)
        print(msg, file=sys.stderr)
        self.per_mu_metrics, self._window, self._pending_hist = False, [], None

    def _daro_loss(self, model, inputs):
        """Training: the whole optimizer update runs at its last micro-batch, through daro-lab's update unit
        (`trainer.update.backward_minibatch`, the trainer's own: totals, the 'grad' signal, every micro-batch's exact
        share of the update's loss, backward by backward); the other micro-batches return a zero that carries no
        gradient. Evaluation: the batch's DARO loss."""
        K, s, w_mod = self.K, self.daro_settings, self.daro_weights
        if not self.model.training:  # evaluation: this batch's DARO loss, nothing kept
            b = self.policy_batch(inputs, self._forward(model, inputs)[0])
            s_eval = s if s.weight_signal != "grad" else dataclasses.replace(s, weight_signal="abs")  # no backward here
            return loss_terms("daro", b, K, s_eval, weights=w_mod().detach(), daro_state=w_mod.state()).loss
        dev = inputs["completion_ids"].device
        M = self.current_gradient_accumulation_steps
        if (self._step + 1) % M:  # TRL counts this micro-batch after it: not the update's last one yet
            return torch.zeros((), device=dev, requires_grad=True)
        start = (self._step + 1 - M) % self.args.steps_per_generation
        passes = self._buffered_inputs[start : start + M]
        if len(passes) != M or passes[-1] is not inputs:
            raise RuntimeError(
                f"DARO: the update's {M} micro-batches are not the generation batch's {start}.."
                f"{start + M - 1} ending with this micro-batch (found {len(passes)})"
            )
        runtime = TRLRuntime(self, model)
        self._daro_result = backward_minibatch("daro", passes, K, s, self.daro_shard, runtime, weights=w_mod)
        ent = self.daro_shard.reduce(torch.stack(list(runtime.entropy.values())).sum(0), "sum")  # [entropy, tokens]
        self._metrics["train"]["entropy"].append(float(ent[0] / ent[1].clamp(min=1)))
        # what HF logs as this update's loss (its backward is a no-op: the unit has done the update's)
        return torch.zeros((), device=dev, requires_grad=True) + self._daro_result.metrics[LOSS_TOTAL]

    # ---------------------------------------------------------------------------------------------------------
    # per update: metrics, table rows; after the optimizer step: DARO's weights

    def training_step(self, model, inputs, num_items_in_batch):
        out = super().training_step(model, inputs, num_items_in_batch)  # TRL counts the micro-step (self._step)
        if self.model.training and self._step % self.current_gradient_accumulation_steps == 0:
            self._end_update()
        return out

    def _end_update(self) -> None:
        """After the update's last backward, before the optimizer step: its metrics; DARO: release absent groups."""
        window, self._window = self._window, []
        metrics: dict[str, float] = {}
        if self.is_daro:
            res, self._daro_result = self._daro_result, None
            if res is None:
                return
            metrics = dict(res.metrics)  # the update's, all processes
            self.daro_weights.release_absent(metrics)
            self._daro_next_state = res.daro_state
            window = [{"batch": res.batch}]
        elif window:
            batch = cat_batches([r["batch"] for r in window])
            with torch.no_grad():
                totals = Totals.combine([batch_totals(batch, self.K, self.daro_settings)], self.daro_shard)
                t = loss_terms(self.daro_method, batch, self.K, self.daro_settings, totals=totals)
                metrics = MetricSums.combine([t.stats], self.daro_shard).finish()
            if self.trl_terms_exact:
                metrics.update(self._trl_terms(window, metrics))
        else:
            return
        if window:
            self.last_update_batch = cat_batches([r["batch"] for r in window])
            metrics.update(self._prompt_counts(self.last_update_batch, metrics))
        if self._pending_hist is not None:
            h, K = self._pending_hist, self.K
            metrics["rollout/prompts_mu0"], metrics["rollout/prompts_mu1"] = float(h[0]), float(h[K])
            metrics["rollout/kept_prompts"] = float(h[1:K].sum())
        if not self.per_mu_metrics:  # DARO without the instrumentation: its weights' metrics only (after the step)
            self._pending_hist = None
            return
        step = self.state.global_step + 1
        G, spg = self.current_gradient_accumulation_steps, self.args.steps_per_generation
        minibatch = ((self._step - 1) % spg) // G if spg >= G else 0
        for key, v in metrics.items():  # daro/weight/ (the weights after the step) comes in _after_optimizer_step
            self._metrics["train"][key].append(float(v))
        if self.accelerator.is_main_process:
            rows = per_mu_rows(metrics, self.K, step=step, minibatch=minibatch)
            for r in rows:
                key = mu_key(r["k"], self.K)
                if f"trl/contrib/{key}" in metrics:  # columns named as the metrics (daro-lab's record)
                    r["trl/contrib"], r["trl/scale"] = metrics[f"trl/contrib/{key}"], metrics[f"trl/scale/{key}"]
            self.per_mu_rows.extend(rows)
            if self._pending_hist is not None:
                h, K = self._pending_hist, self.K
                self.mu_hist_rows.extend(
                    {"step": step, "k": k, "K": K, "mu": k / K, "prompts": int(h[k])} for k in range(K + 1)
                )
        self._pending_hist = None

    def _prompt_counts(self, batch: PolicyBatch, metrics: dict) -> dict[str, float]:
        """Prompts per k over the whole update. The loss counts the distinct prompts of each part it is given and sums
        over parts (daro-lab splits whole prompts over ranks); TRL shuffles completions into micro-batches and slices
        processes by completions, so one prompt may sit in several parts: count it once."""
        pairs = set(zip(batch.prompt_index.tolist(), batch.num_correct.tolist()))
        if self.daro_shard.world_size > 1:
            import torch.distributed as dist

            parts: list = [None] * self.daro_shard.world_size
            dist.all_gather_object(parts, sorted(pairs))
            pairs = {tuple(x) for part in parts for x in part}
        K = self.K
        counts = [0] * (K + 1)
        for _, k in pairs:
            counts[k] += 1
        out = {f"prompts/{mu_key(kk, K)}": float(counts[kk]) for kk in group_keys(metrics, "loss")}
        out.update(
            {
                "batch/prompts": float(sum(counts)),
                "batch/prompts_mu0": float(counts[0]),
                "batch/prompts_mu1": float(counts[K]),
            }
        )
        return out

    def _trl_terms(self, window: list[dict], metrics: dict) -> dict[str, float]:
        """TRL's C_mu, S_mu and loss of the update, with TRL's normalisers (module docstring)."""
        K, s = self.K, self.daro_settings
        P = self.accelerator.num_processes
        contrib = torch.zeros(K + 1, dtype=torch.float64)
        scale = torch.zeros(K + 1, dtype=torch.float64)
        for r in window:
            b: PolicyBatch = r["batch"]
            c = trl_coefficients(
                self.loss_type,
                b.mask,
                self.current_gradient_accumulation_steps,
                self.max_completion_length,
                r["num_items"],
                P,
                self.args.steps_per_generation,
            )
            on = b.mask.bool()
            logp = torch.where(on, b.logp, torch.zeros_like(b.logp)).double()
            old = torch.where(on, b.old_logp, torch.zeros_like(b.old_logp)).double()
            adv = b.advantages.double()
            l = clipped_surrogate(logp, old, adv, s.eps_low, s.eps_high, s.dual_clip).loss
            if s.kl_beta > 0:
                ref = torch.where(on, b.ref_logp, torch.zeros_like(b.ref_logp)).double()
                kl = kl_k3(logp, ref)
                l = l + s.kl_beta * (kl * torch.exp(logp - old) if s.kl_ratio else kl)
            l = torch.where(on, l, torch.zeros_like(l))
            k = b.num_correct.cpu()
            contrib.index_add_(0, k, (c * l).sum(1).cpu())
            scale.index_add_(0, k, (c * adv.abs()[:, None]).sum(1).cpu())
        sums = self.daro_shard.reduce(torch.cat([contrib, scale]).to(self.accelerator.device), "sum").cpu() / P
        contrib, scale = sums[: K + 1], sums[K + 1 :]
        out = {"trl/loss": float(contrib.sum())}
        for kk in group_keys(metrics, "loss"):
            key = mu_key(kk, K)
            out[f"trl/contrib/{key}"], out[f"trl/scale/{key}"] = float(contrib[kk]), float(scale[kk])
        return out

    def _after_optimizer_step(self) -> None:
        if self.daro_weights is None:
            return
        m = {
            **self.daro_weights.project_(),
            **self.daro_weights.metrics(),
        }  # bound hits, daro/weight/mu_kofK after the step
        self.daro_weights.set_state(self._daro_next_state)
        self._daro_next_state = None
        for p in self.daro_weights.parameters():  # TRL zeroes the model's gradients only
            p.grad = None
        for g in self.optimizer.param_groups:
            if g.get("name") == "daro_weights":
                m["lr/weights"] = g["lr"]
        for key, v in m.items():
            self._metrics["train"][key].append(float(v))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # daro-lab's name of the policy's gradient norm before clipping (analyses' grad-norms figure)
        if logs.get("grad_norm") is not None and GRAD_NORM not in logs:
            logs[GRAD_NORM] = logs["grad_norm"]
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------------------
    # checkpoints

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.daro_weights is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.daro_weights.state_dict(), os.path.join(folder, WEIGHTS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and self.daro_weights is not None:
            path = os.path.join(checkpoint, WEIGHTS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"checkpoint {checkpoint} has no {WEIGHTS_FILE}: it was not written by a "
                    "DaroGRPOTrainer with loss_type='daro'"
                )
            self.daro_weights.load_state_dict(torch.load(path, map_location=self.accelerator.device, weights_only=True))
        super()._load_optimizer_and_scheduler(checkpoint)

    # ---------------------------------------------------------------------------------------------------------
    # recording: daro-lab's params and tags, the per_mu and mu_hist tables

    def right_answer_text(self) -> str:
        """The notion of a right completion in use, as the run's tag says it."""
        if self.right_answer == "threshold":
            return f"reward > {self.pass_threshold}"
        configured = getattr(self.args, "right_answer", "auto")
        return self.right_answer + (" (auto)" if configured == "auto" else "")

    def daro_lab_params(self) -> dict[str, str]:
        """The params daro-lab's analyses read, with daro-lab's names."""
        a, K = self.args, self.K
        per_update = a.per_device_train_batch_size * a.gradient_accumulation_steps * self.accelerator.num_processes
        p = {
            "algo.method": self.daro_method,
            "rollout.num_responses": K,
            "trainer.mini_batch_prompts": max(per_update // K, 1),
            "trainer.prompts_per_step": max(a.generation_batch_size // K, 1),
            "rollout.max_new_tokens": self.max_completion_length,
            "algo.eps_low": self.epsilon_low,
            "algo.eps_high": self.epsilon_high,
            "algo.kl_beta": self.beta,
            "algo.dual_clip": getattr(a, "delta", None),
            "algo.std": "unbiased",
            "algo.adv_eps": 1e-6 if self.is_daro else TRL_ADV_EPS,
            "trainer.lr": a.learning_rate,
            "trainer.steps": a.max_steps,
            "daro_lab.trl.loss_type": self.loss_type,
            "daro_lab.trl.right_answer": getattr(a, "right_answer", "auto"),
            "daro_lab.trl.pass_threshold": self.pass_threshold,
        }
        if self.is_daro:
            s = self.daro_settings
            p.update(
                {
                    "algo.daro.lr_w": a.daro_lr_w,
                    "algo.daro.signal": s.weight_signal,
                    "algo.daro.reg": s.reg,
                    "algo.daro.signal_ema": s.signal_ema,
                    "algo.daro.param": a.daro_param,
                    "algo.daro.init": a.daro_init,
                    "algo.daro.w_min": a.daro_w_min,
                    "algo.daro.w_max": a.daro_w_max,
                }
            )
        return {k: str(v) for k, v in p.items()}

    def _recording_begin(self, state) -> None:
        a = self.args
        if not self.accelerator.is_main_process or "mlflow" not in (a.report_to or []):
            self._restore_local_tables(state)
            return
        import mlflow

        from daro_lab.tracking import RunStore

        run = mlflow.active_run()
        if run is None:
            warnings.warn(
                "report_to includes mlflow but no MLflow run is active: daro-lab's params and tables "
                "are written to output_dir only",
                stacklevel=2,
            )
            self._restore_local_tables(state)
            return
        uri, run_id = mlflow.get_tracking_uri(), run.info.run_id
        self._mlflow = (uri, run_id)
        store = RunStore(uri)
        client = store.client
        store.log_params(run_id, self.daro_lab_params())
        label = getattr(a, "daro_arm_label", None) or f"{METHODS[self.daro_method].label} (TRL)"
        store.set_tags(
            run_id,
            {
                TAG_METHOD: self.daro_method,
                TAG_SEED: str(a.seed),
                TAG_ARM_LABEL: label,
                TAG_SOURCE: "trl",
                TAG_RIGHT_ANSWER: self.right_answer_text(),
            },
        )
        if state.global_step > 0:  # resumed: the rows written up to the checkpoint, none after it
            from daro_lab.tracking import TrackingError, read_table

            for name, rows in (("per_mu", self.per_mu_rows), ("mu_hist", self.mu_hist_rows)):
                try:
                    df = read_table(client, run_id, name)
                except TrackingError:
                    continue
                rows[:0] = df[df.step <= state.global_step].to_dict("records")
        else:
            self._restore_local_tables(state)

    def _restore_local_tables(self, state) -> None:
        if state.global_step <= 0 or not self.accelerator.is_main_process:
            return
        import pandas as pd

        for name, rows in (("per_mu", self.per_mu_rows), ("mu_hist", self.mu_hist_rows)):
            path = os.path.join(self.args.output_dir, TABLES_DIR, f"{name}.parquet")
            if os.path.isfile(path):
                df = pd.read_parquet(path)
                rows[:0] = df[df.step <= state.global_step].to_dict("records")

    def write_tables(self) -> None:
        """Write the per_mu and mu_hist tables to <output_dir>/tables/ and, with MLflow, as artifacts tables/."""
        if not self.accelerator.is_main_process or not (self.per_mu_rows or self.mu_hist_rows):
            return
        import pandas as pd

        folder = os.path.join(self.args.output_dir, TABLES_DIR)
        os.makedirs(folder, exist_ok=True)
        paths = []
        for name, rows in (("per_mu", self.per_mu_rows), ("mu_hist", self.mu_hist_rows)):
            if rows:
                path = os.path.join(folder, f"{name}.parquet")
                pd.DataFrame(rows).to_parquet(path, index=False)
                paths.append(path)
        if self._mlflow is not None:
            from daro_lab.tracking import RunStore

            uri, run_id = self._mlflow
            RunStore(uri).log_files(run_id, paths, TABLES_DIR)


class TRLRuntime:
    """The update unit's `Runtime` (daro_lab.trainer.update) over TRL's model: a pass is one of TRL's buffered
    micro-batches; log-probs from GRPOTrainer's own forward; gradients of the model's trainable parameters (accelerate's
    DDP wrapper or the bare module; summed over processes where the unit needs the whole update's); the backward
    through accelerate (its loss scaler). Keeps each pass's entropy sum for TRL's `entropy` metric."""

    def __init__(self, trainer: DaroGRPOTrainer, model):
        self.trainer, self.model = trainer, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.entropy: dict[int, Tensor] = {}  # id(pass) -> [entropy sum, tokens] of its first forward

    def batch(self, inputs, forward: bool = True) -> PolicyBatch:
        tr = self.trainer
        if not forward:
            return tr.policy_batch(
                inputs, torch.zeros(inputs["completion_mask"].shape, device=inputs["completion_mask"].device)
            )
        first = id(inputs) not in self.entropy  # a pass's forwards all see the update's parameters: one entropy
        logp, entropies, _ = tr._forward(self.model, inputs, entropy=first)
        if first:
            m = tr._loss_mask(inputs).float()
            self.entropy[id(inputs)] = torch.stack([(entropies.detach().float() * m).sum(), m.sum()])
        return tr.policy_batch(inputs, logp)

    def no_sync(self, skip: bool):
        return self.trainer.accelerator.no_sync(self.model) if skip else contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.trainer.accelerator.backward(loss)

    def grad_vectors(self, xs: list[Tensor]) -> list[Tensor]:
        flats = [flat_grad(x, self.params).float() for x in xs]
        shard = self.trainer.daro_shard
        return flats if shard.world_size == 1 else [shard.reduce(f, "sum") for f in flats]

    def grad_vector(self) -> Tensor:
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in self.params]
        )

    def gram(self, vectors: list[Tensor]) -> Tensor:
        if not vectors:
            return torch.zeros(0, 0, dtype=torch.float64)
        V = torch.stack(vectors).double()  # [n, D]
        return V @ V.T

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.trainer.daro_weights.zero_grad(set_to_none=True)


class _DaroLabCallback(TrainerCallback):
    """DaroGRPOTrainer's hooks into the HF training loop (added by the trainer itself)."""

    def __init__(self, trainer: DaroGRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._recording_begin(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        self.trainer.write_tables()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.write_tables()
