"""Tasks: prompts with verifiable answers, and the reward that checks a response against them.

A task is two functions: `build(cfg) -> (train, eval)` problem lists, deterministic from
`cfg.data_seed`, and `reward_batch(responses, answers) -> rewards` in {0.0, 1.0}. A response is
the model's completion text after the prompt, already cut at the end-of-sequence token. The tasks are
registered by name in `registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from daro_lab.config import TaskConfig


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer; `level` is the difficulty (arithmetic: operand digits); `source`
    says where a problem read from a file came from ("data file x.jsonl: line 17"), for error messages."""

    prompt: str
    answer: str
    level: int
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Task:
    """A registered task: how to build its problems and how to score responses. Generated tasks also draw
    fresh problems (`sample`, for the tiny preset's supervised warm start) and count their prompts."""

    name: str
    build: Callable[[TaskConfig], tuple[list[Problem], list[Problem]]]
    reward_batch: Callable[[list[str], list[str]], list[float]]
    sample: Callable[..., Problem] | None = None  # sample(rng, cfg) -> a problem drawn like the training set
    num_distinct: Callable[[TaskConfig], int] | None = None
    run_on: Callable[[Problem, TaskConfig], str] | None = None  # a demonstration that does not stop (warm start)
    run_on_weight: Callable[[Problem, TaskConfig], float] | None = None  # its relative frequency for a problem
