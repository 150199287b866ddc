"""Tasks: prompts, reference answers and verifiers (see `base.py`)."""

from daro_lab.tasks.base import Problem, Task, build_task, get_task, task_names

__all__ = ["Problem", "Task", "build_task", "get_task", "task_names"]
