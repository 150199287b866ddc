"""Mixed precision: fp32 master weights and AdamW states, compute in model.dtype (bf16 on GPU).

A bf16 parameter holds ~3 significant digits, so AdamW steps below ~0.4% of a weight round away: at the
paper's lr 1e-6 a bf16 policy barely moves. With `trainer.mixed_precision` (the default) and model.dtype
bf16/fp16, the trainer keeps the policy in fp32 (parameters, gradients, AdamW states) and runs its
log-prob forwards under torch.autocast in model.dtype; FSDP does the same through its MixedPrecisionPolicy.
The transformers engine generates from a copy of the policy in model.dtype, refreshed after each update;
vLLM holds its own copy and is synced from the fp32 masters directly (it casts; FSDP shards are gathered
one at a time). Memory: 16 bytes a parameter for training (+2 for the transformers engine's copy),
against 12 in pure bf16.
"""

from __future__ import annotations

import copy

import torch

from daro_lab.trainer.fsdp import full


def precision_plan(compute_is_fp32: bool, mixed_precision: bool, fsdp: bool, engine: str) -> tuple[bool, bool]:
    """(fp32 master weights?, a generation copy in the compute dtype?) for a policy computing in fp32 or not,
    `trainer.mixed_precision`, FSDP (which always keeps fp32 masters) and `rollout.engine`. The trainer and
    the memory plan both decide by this. Only the transformers engine needs the copy: vLLM holds its own."""
    masters = fsdp or (not compute_is_fp32 and mixed_precision)
    return masters, masters and engine == "hf"


class GenerationCopy:
    """A full copy of the policy in the compute dtype, for generation and evaluation.

    Built from the policy before it becomes fp32 masters (or FSDP shards); `refresh(policy)` copies every
    parameter into it, all-gathering FSDP shards (a collective: every rank calls it at the same point).
    """

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype):
        self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        dst = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():  # tied parameters once (named_parameters dedups)
            dst[name].copy_(full(p.detach()))
