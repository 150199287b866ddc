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

    def rows(self, idx: torch.Tensor) -> "RolloutBatch":
        """The rows `idx`, trimmed to their longest response and to the prompt columns they use."""
        rm = self.response_mask[idx]
        T = int(rm.sum(1).max()) if len(idx) else 0
        pm = self.prompt_mask[idx]
        P0 = int((~pm).all(0).sum()) if len(idx) else 0  # columns of padding in every row (left)
        return RolloutBatch(
            self.prompt_ids[idx][:, P0:],
            pm[:, P0:],
            self.response_ids[idx][:, :T],
            rm[:, :T],
            self.logprobs[idx][:, :T],
            self.prompt_index[idx],
        )

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Batches one after another (prompt indices renumbered), padded to the widest."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.response_ids.shape[1] for b in batches)
        pad = torch.nn.functional.pad
        out, offset = [], 0
        for b in batches:
            dp, dt = P - b.prompt_ids.shape[1], T - b.response_ids.shape[1]
            out.append(
                (
                    pad(b.prompt_ids, (dp, 0), value=pad_id),
                    pad(b.prompt_mask, (dp, 0), value=False),
                    pad(b.response_ids, (0, dt), value=pad_id),
                    pad(b.response_mask, (0, dt), value=False),
                    pad(b.logprobs, (0, dt)),
                    b.prompt_index + offset,
                )
            )
            offset += int(b.prompt_index.max()) + 1
        return RolloutBatch(*[torch.cat(parts) for parts in zip(*out)])

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


def check_generate_args(
    prompts: list[list[int]], num_responses: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """The argument checks every engine's `generate` shares: ValueError naming the bad one."""
    if num_responses < 1:
        raise ValueError(f"num_responses must be >= 1, got {num_responses}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids [n, P] long, prompt_mask [n, P] bool, lengths [n] long): prompts LEFT-padded with pad_id."""
    n, P = len(prompts), max((len(p) for p in prompts), default=0)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long).reshape(n, P)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids, torch.arange(P) >= (P - lens).unsqueeze(1), lens


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples K responses per prompt. Implementations: `daro_lab.rollout.hf.HFEngine`, `vllm_engine.VLLMEngine`."""

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

    def close(self) -> None:
        """Free what the engine holds beyond the policy (vLLM: its memory and distributed state)."""
        ...
