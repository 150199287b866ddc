"""The registry of tasks: name -> `Task` (how to build its problems, how to score responses, its config rules).

The config's task.name and eval.reward accept exactly these names (`daro_lab.config.validate`). A new task is
one module (build, reward_batch, and optionally levels and check) plus one `register_task(Task(...))`, here for a
built-in task or in the user's own code before the config is loaded.
"""

from __future__ import annotations

from daro_lab.tasks import arithmetic, chain, files
from daro_lab.tasks import math as math_task
from daro_lab.tasks.base import Problem, Task, TaskConfig

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` under `task.name` (config keys task.name, eval.reward); a name taken is an error."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


register_task(
    Task(
        "arithmetic",
        arithmetic.build,
        arithmetic.reward_batch,
        sample=arithmetic.sample_problem,
        num_distinct=arithmetic.num_distinct,
        levels=arithmetic.levels,
        check=arithmetic.check,
    )
)
register_task(  # running sums
    Task(
        "chain",
        chain.build,
        chain.reward_batch,
        sample=chain.sample_problem,
        num_distinct=chain.num_distinct,
        run_on=chain.run_on,
        run_on_weight=chain.run_on_weight,
        levels=chain.levels,
        check=chain.check,
    )
)
register_task(Task("math", math_task.build, math_task.reward_batch))  # data files, math-verify on the last \\boxed{}
register_task(Task("file", files.build, files.reward_batch))  # data files, exact match of the stripped response


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
