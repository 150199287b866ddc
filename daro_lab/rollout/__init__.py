"""Rollout engines: sample K responses per prompt and score them under the policy.

`HFEngine` (transformers) is imported lazily so that importing this package does not import transformers.
"""

from __future__ import annotations

from typing import Any

from daro_lab.rollout.base import RolloutBatch, RolloutEngine
from daro_lab.rollout.logprobs import sequence_logprobs

__all__ = ["HFEngine", "RolloutBatch", "RolloutEngine", "sequence_logprobs"]


def __getattr__(name: str) -> Any:
    if name == "HFEngine":
        from daro_lab.rollout.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
