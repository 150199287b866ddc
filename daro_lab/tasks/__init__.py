"""Tasks: prompts, reference answers and verifiers (`base.py`: Problem, Task; `registry.py`: the tasks by name)."""

from daro_lab.tasks.base import Problem, Task, TaskConfig
from daro_lab.tasks.registry import TASKS, build_task, get_task, register_task, task_names

__all__ = ["TASKS", "Problem", "Task", "TaskConfig", "build_task", "get_task", "register_task", "task_names"]
