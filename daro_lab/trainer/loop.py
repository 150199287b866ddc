"""The RL loop: generate, score, compute advantages, update mini-batch by mini-batch.

One step (docs/math.md):
    N prompts x K responses          (DAPO dynamic sampling: more batches until N have 0 < mu < 1)
    rewards [N, K] -> keep 0 < mu < 1 -> advantages over the kept prompts, once
    old log-probs for the off-policy mini-batches (the first one is on-policy: old = current)
    for each mini-batch: update.backward_minibatch (its totals over its passes and ranks -> each pass's exact
                         share of the loss -> backward, gradients accumulating over the passes of
                         trainer.micro_batch_prompts prompts; G_mu and cosines on the measured steps)
                         -> clip -> AdamW (policy + DARO weights)
    engine sync: the next generation samples from the updated policy
Hooks see every stage and change nothing; the trainer never logs by itself. How the model runs (DDP or FSDP2,
fp32 masters, the reference, the generation copy) is `policy.py`'s; which prompts each pass and rank runs is
`plan.py`'s. Under torchrun the step is split over data-parallel ranks as `daro_lab/distributed.py` describes.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from daro_lab import distributed as dp
from daro_lab.algorithms import METHODS, DaroWeights, LossSettings, PolicyBatch, compute_advantages, kept_prompts
from daro_lab.config import Config, ConfigError
from daro_lab.hooks.base import Hook, MiniBatchView
from daro_lab.record import GRAD_CLIPPED, GRAD_NORM
from daro_lab.rollout import RolloutBatch
from daro_lab.trainer import fsdp
from daro_lab.trainer.checkpoint import load_trainer, save_trainer
from daro_lab.trainer.evaluate import evaluate
from daro_lab.trainer.measures import engine_gap, rollout_metrics
from daro_lab.trainer.plan import PassPlan, plan_minibatches
from daro_lab.trainer.policy import Policy
from daro_lab.trainer.setup import build_engine, build_static_weights, load_components
from daro_lab.trainer.threads import fair_threads, others_cores
from daro_lab.trainer.update import Pass, PolicyRuntime, backward_minibatch, cat_batches, pad_cat

TORCH_THREADS = torch.get_num_threads()  # torch's default, before any run set its own


class Trainer:
    """Owns the model, the optimizer, the data position and the RNG; `train_step()` runs one RL step."""

    def __init__(self, cfg: Config, hooks: list[Hook] | None = None):
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.dist = dp.init_from_env()  # torchrun: rank and world size; one process: rank 0 of 1
        if not cfg.trainer.threads and cfg.trainer.device == "cpu" and not self.dist.enabled:
            # 0: the cores other processes leave free now, resolved once and logged with the config (threads.py)
            cfg.trainer.threads = fair_threads(TORCH_THREADS, others_cores())
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        if cfg.trainer.prompts_per_step < self.dist.world_size:
            raise ConfigError(
                f"config key 'trainer.prompts_per_step' = {cfg.trainer.prompts_per_step}: "
                f"need at least one prompt per data-parallel rank ({self.dist.world_size})"
            )
        self.shard = dp.loss_shard(self.dist)
        self.device = torch.device(cfg.trainer.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cuda" and (
            not torch.cuda.is_available() or (self.device.index or 0) >= torch.cuda.device_count()
        ):
            raise ConfigError(
                f"config key 'trainer.device' = {cfg.trainer.device!r}: no such CUDA device here "
                f"({torch.cuda.device_count()} visible)"
            )
        torch.manual_seed(cfg.seed)
        # frozen weights from a file: read (and refused, naming key and file) before the model's minutes of set-up
        static = build_static_weights(cfg) if METHODS[cfg.algo.method].weights == "frozen" else None
        c = load_components(cfg)  # model, tokenizer, problems, task: fails before any run exists
        self.tokenizer, self.task = c.tokenizer, c.task
        self.train_set, self.eval_set = c.train_set, c.eval_set
        self.dropped = c.dropped  # prompts left out as too long (task.long_prompts = 'drop'), by set
        # the model and how it runs: DDP or FSDP2, fp32 masters under autocast, the reference, the generation copy
        self.policy = Policy(c.model, cfg, self.dist, self.device)
        self.engine = build_engine(cfg, self.policy.generation_model, self.tokenizer, dtype=self.policy.compute)
        self.method = METHODS[cfg.algo.method]
        self.K = cfg.rollout.num_responses
        self.settings = LossSettings.from_config(cfg)
        d = cfg.algo.daro
        self.weights: DaroWeights | None = None
        if self.method.weights != "none":
            self.weights = DaroWeights(self.K, d.param, d.init, d.w_min, d.w_max).to(self.device)
            if self.method.weights == "frozen":
                self.weights.load_values(static)
                self.weights.requires_grad_(False)
        groups = [
            {
                "params": [p for p in self.model.parameters() if p.requires_grad],
                "lr": cfg.trainer.lr,
                "weight_decay": cfg.trainer.weight_decay,
                "name": "policy",
            }
        ]
        if self.weights is not None and self.method.weights == "learned":
            groups.append(self.weights.param_group(d.lr_w))
        self.opt = torch.optim.AdamW(groups, lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas))
        self.runtime = PolicyRuntime(self.policy, self.opt, self.shard, self.K, self.device)
        # every rank samples its own prompts with its own stream; rank 0 (or a single process) uses the seed
        self.rollout_gen = torch.Generator().manual_seed(cfg.seed + 7_777_777 * self.dist.rank)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.order = torch.randperm(len(self.train_set), generator=self.data_gen)
        self.cursor = 0
        self.step = 0  # steps completed

    # the policy's parts, by the names the checkpoint code and the tests use
    model = property(lambda self: self.policy.model)
    fsdp = property(lambda self: self.policy.fsdp)
    gen = property(lambda self: self.policy.gen)
    generation_model = property(lambda self: self.policy.generation_model)

    def _group(self, name: str) -> dict:
        """The optimizer's parameter group `name` ('policy', 'daro_weights')."""
        return next(g for g in self.opt.param_groups if g.get("name") == name)

    def _sync_engine(self) -> None:
        """After the policy moved: refresh the generation copy (FSDP: a collective), then the engine (vLLM)."""
        self.policy.refresh_copy()
        self.engine.sync_weights(self.policy.generation_model)

    # -- data ---------------------------------------------------------------------------------

    def next_problems(self, n: int) -> list:
        out = []
        while len(out) < n:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(len(self.train_set), generator=self.data_gen)
                self.cursor = 0
            take = self.order[self.cursor : self.cursor + n - len(out)].tolist()
            self.cursor += len(take)
            out += [self.train_set[i] for i in take]
        return out

    def generate(self, problems: list) -> tuple[RolloutBatch, torch.Tensor, list[str]]:
        """K responses per problem, scored: (rollout, rewards [P, K], response texts)."""
        r = self.cfg.rollout
        ids = self.tokenizer.encode_prompts([p.prompt for p in problems])
        batch = self.engine.generate(
            ids,
            self.K,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            generator=self.rollout_gen,
        )
        texts = self.tokenizer.decode_responses(batch.response_ids)
        answers = [p.answer for p in problems for _ in range(self.K)]
        rewards = torch.tensor(self.task.reward_batch(texts, answers), dtype=torch.float32).view(-1, self.K)
        return batch, rewards, texts

    # -- one step -----------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        step = self.step + 1  # steps are numbered from 1; step 0 is the starting policy
        N = cfg.trainer.prompts_per_step
        self._group("policy")["lr"] = policy_lr(cfg.trainer, step)
        t0 = time.perf_counter()
        rollouts, rewards, problems, texts = [], [], [], []
        n_kept, n_batches = 0, 0
        while True:  # one batch, or more under dynamic sampling
            probs = self.next_problems(N)  # the same N prompts on every data-parallel rank
            b, r, tx = self.generate(probs[dp.split(len(probs), self.dist)])  # this rank's slice
            if self.dist.enabled:  # every rank gets the whole batch, in prompt order
                parts = dp.gather_objects((b, r, tx), self.dist)
                b, r, tx = (
                    RolloutBatch.concat([x[0] for x in parts], self.tokenizer.pad_token_id),
                    torch.cat([x[1] for x in parts]),
                    [t for x in parts for t in x[2]],
                )
            rollouts.append(b), rewards.append(r), problems.extend(probs), texts.extend(tx)
            n_batches += 1
            n_kept += int(kept_prompts(r).sum())
            if not cfg.trainer.dynamic_sampling or n_kept >= N or n_batches >= cfg.trainer.dynamic_sampling_max_batches:
                break
        roll = RolloutBatch.concat(rollouts, self.tokenizer.pad_token_id)
        rewards = torch.cat(rewards)  # [P, K]
        for h in self.hooks:
            h.on_rollout(step, [p.prompt for p in problems], texts, rewards, [p.answer for p in problems])
        keep = kept_prompts(rewards)
        t_gen = time.perf_counter() - t0

        m: dict[str, float] = rollout_metrics(roll, rewards, keep, n_batches)
        mb_metrics, t_old, t_upd = self.update(step, roll, rewards)
        self.step = step

        m.update(_mean_metrics(mb_metrics))
        if self.weights is not None:
            m.update(self.weights.metrics())
        m["lr/policy"] = self._group("policy")["lr"]
        if self.weights is not None and self.method.weights == "learned":
            m["lr/weights"] = self._group("daro_weights")["lr"]
        dt = time.perf_counter() - t0
        m.update(
            {
                "time/generate": t_gen,
                "time/old_logprobs": t_old,
                "time/update": t_upd,
                "time/step": dt,
                "perf/tokens_per_s": float(roll.response_mask.sum()) / max(dt, 1e-9),
                "perf/threads": torch.get_num_threads(),
            }
        )  # the run's count, unless other code changed it
        for h in self.hooks:
            h.on_step_end(step, dict(m))
        return m

    def update(
        self, step: int, roll: RolloutBatch, rewards: torch.Tensor
    ) -> tuple[list[dict[str, float]], float, float]:
        """The policy (and DARO weights) update of one step on its scored rollouts, rewards [P, K].

        Keeps the prompts with 0 < mu < 1 (at most N), computes their advantages once, plans the mini-batches
        (`plan.plan_minibatches`: one optimizer step each, the first on-policy, later ones off-policy, each in
        passes of at most `micro_batch_prompts` prompts, as many on every rank), computes the off-policy
        mini-batches' old log-probs before the first update, then updates mini-batch by mini-batch.
        Data-parallel: every rank passes the whole batch and updates on its part of each mini-batch.
        Returns (metrics of each mini-batch, seconds of old log-probs, seconds of updates).
        """
        cfg = self.cfg
        kept = torch.nonzero(kept_prompts(rewards)).flatten()[: cfg.trainer.prompts_per_step]  # [P] prompt indices
        if not len(kept):
            return [], 0.0, 0.0
        adv = compute_advantages(rewards[kept], self.method.advantage, cfg.algo.std, cfg.algo.adv_eps)  # [P, K]
        plans = plan_minibatches(
            len(kept),
            cfg.trainer.mini_batch_prompts,
            cfg.trainer.micro_batch_prompts,
            self.dist.world_size,
            self.dist.rank,
        )
        t1 = time.perf_counter()
        with torch.no_grad():  # every pass's old (off-policy) and reference log-probs, before any update
            passes = [[self._pass(roll, rewards, kept, adv, p, plan.on_policy) for p in plan.passes] for plan in plans]
        t_old = time.perf_counter() - t1
        t2 = time.perf_counter()
        out = [self._update(step, plan.index, ps) for plan, ps in zip(plans, passes)]
        self._sync_engine()  # the next generation samples from the updated policy
        return out, t_old, time.perf_counter() - t2

    def _pass(
        self,
        roll: RolloutBatch,
        rewards: torch.Tensor,
        kept: torch.Tensor,
        adv: torch.Tensor,
        p: PassPlan,
        on_policy: bool,
    ) -> Pass:
        """The data of one planned pass: its rows, advantages and rewards, old and reference log-probs (no grad).
        A filler pass (this rank holds fewer prompts than another) has rows without tokens: its forwards keep the
        collectives in step and count for nothing."""
        K = self.K
        if p.filler:
            first = roll.rows(torch.arange(K) + K * int(kept[p.first]))
            rows = dataclasses.replace(
                first,
                response_mask=torch.zeros_like(first.response_mask),
                prompt_index=torch.full_like(first.prompt_index, -1),
            )
            adv_p, rewards_p = torch.zeros(1, K), torch.zeros(1, K)
        else:
            prompts = kept[p.positions]
            rows = roll.rows((prompts[:, None] * K + torch.arange(K)).flatten())
            adv_p, rewards_p = adv[p.positions], rewards[prompts]
        old = None if on_policy else self.policy.logprobs(rows)  # on-policy: the current log-probs are old
        ref = self.policy.logprobs(rows, ref=True) if self.policy.ref_model is not None else None
        return Pass(rows, adv_p, rewards_p, old, ref)

    def _update(self, step: int, index: int, passes: list[Pass]) -> dict[str, float]:
        """One optimizer step on one mini-batch: this rank's passes (update.backward_minibatch: loss, G_mu every
        grad_norm_every steps, backward) -> clip -> AdamW -> DARO weights' projection -> the hooks' view of the
        whole mini-batch."""
        cfg, K = self.cfg, self.K
        self.model.train()
        every = cfg.trainer.grad_norm_every
        r = backward_minibatch(
            cfg.algo.method,
            passes,
            K,
            self.settings,
            self.shard,
            self.runtime,
            self.weights,
            measure_groups=index == 0 and every > 0 and (step % every == 0 or step == 1),
            cosines=cfg.trainer.grad_cosines,
        )
        metrics = r.metrics
        if index == 0:  # on-policy: the trainer's log-probs are the sampler's, up to the engine's numerics
            metrics.update(engine_gap(r.batch, [p.rows.logprobs for p in passes], self.dist))
        clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
        gnorm = fsdp.full(torch.nn.utils.clip_grad_norm_(self.runtime.params, clip))  # FSDP: over all ranks' shards
        metrics[GRAD_NORM] = float(gnorm)  # before clipping
        metrics[GRAD_CLIPPED] = float(gnorm > clip)  # the step's mean: the share of its updates the clip cut
        if not math.isfinite(metrics[GRAD_NORM]):
            raise FloatingPointError(f"non-finite policy gradient norm at step {step}, mini-batch {index}")
        if self.weights is not None and self.method.weights == "learned":
            self.weights.release_absent(r.present[1:K])
        self.opt.step()
        if self.weights is not None:
            metrics.update(self.weights.project_())
            self.weights.set_state(r.daro_state)  # the signal's EMA and the running regulariser constant
        b, factor = self._whole_minibatch(r.batch, r.factor)
        view = MiniBatchView(
            step,
            index,
            K,
            b.logp.detach(),
            b.old_logp.detach(),
            b.mask,
            b.advantages,
            b.num_correct,
            b.prompt_index,
            metrics,
            factor,
        )
        for h in self.hooks:
            h.on_minibatch(view)
        return metrics

    def _whole_minibatch(self, b: PolicyBatch, factor: torch.Tensor) -> tuple[PolicyBatch, torch.Tensor]:
        """The hooks' view: data-parallel, every rank's rows of the mini-batch (filler rows dropped) and their
        clipped factors g, gathered from all ranks (a collective); one process, `b` and `factor` themselves."""
        if not self.dist.enabled:
            return b, factor.detach()
        fields = [f.name for f in dataclasses.fields(PolicyBatch)]
        mine = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k in fields for v in [getattr(b, k)]}
        parts = dp.gather_objects((mine, factor.detach().cpu()), self.dist)
        whole = cat_batches([PolicyBatch(**d) for d, _ in parts])
        g = pad_cat([f for _, f in parts])
        real = whole.prompt_index >= 0
        return PolicyBatch(
            **{k: (v[real] if isinstance(v, torch.Tensor) else v) for k in fields for v in [getattr(whole, k)]}
        ), g[real]

    # -- evaluation and state -----------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        m, table = evaluate(
            self.generation_model,
            self.engine,
            self.tokenizer,
            self.task,
            self.eval_set,
            self.cfg,
            seed=self.cfg.seed + 7919 * (self.step + 1),
            dist=self.dist,
        )
        for h in self.hooks:
            h.on_eval(self.step, m, table)
        return m, table

    def save(self, directory, meta: dict | None = None):
        """Write a checkpoint (every rank calls; rank 0 writes): checkpoint.save_trainer."""
        return save_trainer(self, directory, meta)

    def load(self, directory) -> None:
        """Restore what `save` wrote (every rank): checkpoint.load_trainer."""
        load_trainer(self, directory)


def policy_lr(t, step: int) -> float:
    """Learning rate of step `step` (1-based): linear warm-up, then constant or cosine to 10%."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "cosine":
        frac = min(1.0, (step - 1 - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps))
        return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return t.lr


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over mini-batches of each metric, over the mini-batches that have it (absent groups)."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            acc.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}
