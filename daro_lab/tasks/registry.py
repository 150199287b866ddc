"""The registry of tasks: name -> `Task` (how to build its problems, how to score responses).

The names are the config's `TaskName` choices (task.name, eval.reward); tests/test_tasks.py checks that both
list the same tasks.
"""

from __future__ import annotations

from daro_lab.config import TaskConfig
from daro_lab.tasks import arithmetic, chain, files
from daro_lab.tasks import math as math_task
from daro_lab.tasks.base import Problem, Task

TASKS: dict[str, Task] = {
    "arithmetic": Task(
        "arithmetic", arithmetic.build, arithmetic.reward_batch, arithmetic.sample_problem, arithmetic.num_distinct
    ),
    "chain": Task(
        "chain",
        chain.build,
        chain.reward_batch,
        chain.sample_problem,
        chain.num_distinct,  # running sums
        chain.run_on,
        chain.run_on_weight,
    ),
    "math": Task("math", math_task.build, math_task.reward_batch),  # data files, math-verify on the last \\boxed{}
    "file": Task("file", files.build, files.reward_batch),  # data files, exact match of the stripped response
}


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered task called `name`; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (config key 'task.name'); known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def build_task(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of the task `cfg.name`: deterministic from cfg.data_seed, disjoint prompts."""
    return get_task(cfg.name).build(cfg)
