"""The rollout-engine interface: what every engine (transformers, vLLM) returns and accepts.

Nothing here depends on transformers: an engine takes token-id prompts and returns a `RolloutBatch` of CPU
tensors, so the trainer never sees engine-specific types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class RolloutBatch:
    """Sampled responses for `num_prompts` prompts, `K` responses each, all tensors on CPU.

    B = num_prompts * K rows, prompt-major: rows i*K .. i*K+K-1 belong to prompt i.
    """

    prompt_ids: torch.Tensor  # [B, P] long, LEFT-padded with pad_id
    prompt_mask: torch.Tensor  # [B, P] bool, True on prompt tokens
    response_ids: torch.Tensor  # [B, T] long, right-padded with pad_id; T = longest response (<= max_new_tokens)
    response_mask: torch.Tensor  # [B, T] bool, True on generated tokens, the EOS token included when generated
    logprobs: torch.Tensor  # [B, T] float32, log-prob of each sampled token under the sampling distribution
    #                         (logits / temperature, before top-p truncation); 0 where response_mask is False
    prompt_index: torch.Tensor  # [B] long, which prompt (0 .. num_prompts-1) the row answers

    @property
    def batch_size(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] long, number of generated tokens per row (EOS included)."""
        return self.response_mask.sum(dim=1)

    def validate(self) -> None:
        """Raise ValueError if shapes, dtypes or devices break the contract above (cheap; for tests and new engines)."""
        b, p = self.prompt_ids.shape
        t = self.response_ids.shape[1]
        expect = {
            "prompt_ids": ((b, p), torch.long),
            "prompt_mask": ((b, p), torch.bool),
            "response_ids": ((b, t), torch.long),
            "response_mask": ((b, t), torch.bool),
            "logprobs": ((b, t), torch.float32),
            "prompt_index": ((b,), torch.long),
        }
        for name, (shape, dtype) in expect.items():
            x = getattr(self, name)
            if tuple(x.shape) != shape or x.dtype != dtype or x.device.type != "cpu":
                raise ValueError(
                    f"RolloutBatch.{name}: got {tuple(x.shape)} {x.dtype} on {x.device}, want {shape} {dtype} on cpu"
                )


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples K responses per prompt. Implementations: `daro_lab.rollout.hf.HFEngine` (vLLM later)."""

    def generate(
        self,
        prompts: list[list[int]],
        num_responses: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> RolloutBatch: ...

    def sync_weights(self, model: Any) -> None:
        """Make the engine sample from `model`'s current weights (no-op for an engine that uses the live model)."""
        ...
