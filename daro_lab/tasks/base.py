"""Tasks: prompts with verifiable answers, and the reward that checks a response against them.

A task is two functions: `build(cfg) -> (train, eval)` problem lists, deterministic from
`cfg.data_seed`, and `reward_batch(responses, answers) -> rewards` in {0.0, 1.0}. A response is
the model's completion text after the prompt, already cut at the end-of-sequence token.
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


def _registry() -> dict[str, Task]:
    from daro_lab.tasks import arithmetic, chain, files  # local import: they import Problem from here
    from daro_lab.tasks import math as math_task

    return {
        "arithmetic": Task("arithmetic", arithmetic.build, arithmetic.reward_batch, arithmetic.sample_problem,
                           arithmetic.num_distinct),
        "chain": Task("chain", chain.build, chain.reward_batch, chain.sample_problem, chain.num_distinct,  # running sums
                      chain.run_on, chain.run_on_weight),
        "math": Task("math", math_task.build, math_task.reward_batch),  # data files, math-verify on the last \\boxed{}
        "file": Task("file", files.build, files.reward_batch),  # data files, exact match of the stripped response
    }


def task_names() -> list[str]:
    return sorted(_registry())


def get_task(name: str) -> Task:
    """The registered task called `name`; ValueError naming the known tasks otherwise."""
    tasks = _registry()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} (config key 'task.name'); known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def build_task(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of the task `cfg.name`: deterministic from cfg.data_seed, disjoint prompts."""
    return get_task(cfg.name).build(cfg)
