"""The policy being trained and how it runs: one object the loop asks for log-probs.

    policy = Policy(model, cfg, dist, device)
    logp = policy.logprobs(rows)              # [B, T], differentiable when grad is on
    ref = policy.logprobs(rows, ref=True)     # the frozen reference (KL), when algo.kl_beta > 0
    with policy.no_sync(skip=True): ...       # DDP: no gradient all-reduce in this backward (accumulating)
    policy.refresh_copy()                     # after an update: the copy the transformers engine samples from

It owns what the loop should not have to think about:
- data parallelism under torchrun (`daro_lab/distributed.py`): DDP averages the gradients in backward through a
  module whose forward is the whole log-prob computation; FSDP2 (`fsdp.py`, `trainer.parallel = "fsdp"`) shards
  the model, so every forward of it, with or without grad, goes through its root;
- precision (`precision.py`): fp32 master weights, compute under autocast in model.dtype;
- the reference model of the KL term, a frozen copy of the starting policy;
- the copy in model.dtype that the transformers engine generates from (`generation_model`); vLLM holds its own.
"""

from __future__ import annotations

import contextlib
import copy
from functools import partial

import torch

from daro_lab import distributed as dp
from daro_lab.config import Config
from daro_lab.rollout import RolloutBatch
from daro_lab.rollout.logprobs import sequence_logprobs
from daro_lab.trainer import fsdp
from daro_lab.trainer.precision import GenerationCopy, precision_plan


class Policy:
    """The model being trained (on `device`), its reference, its parallel wrapper and its generation copy."""

    def __init__(self, model: torch.nn.Module, cfg: Config, dist: dp.DistInfo, device: torch.device):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.model = model.to(device)
        self.K = cfg.rollout.num_responses
        self.fsdp = dist.enabled and cfg.trainer.parallel == "fsdp"
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.algo.kl_beta > 0 else None
        # the log-prob forward of the policy (and of the reference) under torchrun: DDP averages the gradients
        # in backward; FSDP shards the model, so every policy forward goes through it, with or without grad
        self.forward = self.ref_forward = None
        # fp32 master weights with compute in model.dtype: training runs on fp32 parameters; the transformers
        # engine generates from `gen`, a copy in model.dtype (FSDP needs one in any case: ranks generate out of
        # step); vLLM holds its own copy, synced from the masters (shards gathered one by one)
        self.compute = next(model.parameters()).dtype
        mixed, copy_for_engine = precision_plan(
            self.compute == torch.float32, cfg.trainer.mixed_precision, self.fsdp, cfg.rollout.engine
        )
        self.gen = GenerationCopy(model, self.compute) if copy_for_engine else None
        self.autocast = None  # the compute dtype of the policy's forwards under autocast (fp32 masters)
        if self.fsdp:
            self.forward = fsdp.shard(model, sequence_logprobs, self.compute)
            if self.ref_model is not None:
                self.ref_forward = fsdp.shard(self.ref_model, sequence_logprobs, self.compute)
        else:
            if mixed:
                model.float()
                self.autocast = self.compute
            if dist.enabled:
                self.forward = dp.wrap_ddp(model, sequence_logprobs, dist)

    @property
    def generation_model(self) -> torch.nn.Module:
        """The model the engine samples from: the policy itself, or, with the transformers engine under mixed
        precision or FSDP, its copy in model.dtype."""
        return self.gen.model if self.gen is not None else self.model

    def refresh_copy(self) -> None:
        """After the policy moved: refresh the generation copy (FSDP: a collective)."""
        if self.gen is not None:
            self.gen.refresh(self.model)

    def logprobs(self, s: RolloutBatch, ref: bool = False) -> torch.Tensor:
        """[B, T] log-probs of the responses of `s` under the policy (or the reference), differentiable when grad
        is on. Rows come in blocks of K sharing one prompt, which is then encoded once (group_size=K)."""
        model = self.ref_model if ref else self.model
        if self.fsdp:  # every forward of a sharded model goes through its root
            fn = self.ref_forward if ref else self.forward
        elif not ref and self.forward is not None and torch.is_grad_enabled():  # DDP: gradients averaged in backward
            fn = self.forward
        else:
            fn = partial(sequence_logprobs, model)
        mixed = self.autocast is not None and not ref
        with torch.autocast(self.device.type, dtype=self.autocast) if mixed else contextlib.nullcontext():
            return fn(
                s.prompt_ids,
                s.prompt_mask,
                s.response_ids,
                s.response_mask,
                temperature=self.cfg.rollout.temperature,
                group_size=self.K,
                chunk_size=self.cfg.model.logprob_chunk_size or None,
            )  # 0: unchunked

    def no_sync(self, skip: bool):
        """DDP: no gradient all-reduce in this backward (accumulating); otherwise a no-op context."""
        ddp = self.dist.enabled and not self.fsdp
        return self.forward.no_sync() if skip and ddp else contextlib.nullcontext()
