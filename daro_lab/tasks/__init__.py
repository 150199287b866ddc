"""Tasks: prompts, reference answers and verifiers (`base.py`: Problem, Task; `registry.py`: the tasks by name)."""

from daro_lab.tasks.base import Problem, Task
from daro_lab.tasks.registry import TASKS, build_task, get_task, task_names

__all__ = ["TASKS", "Problem", "Task", "build_task", "get_task", "task_names"]
