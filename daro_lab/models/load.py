"""`load_policy`, the way to get a policy: a local HF model directory, or the tiny preset warm-started."""

from __future__ import annotations

from daro_lab.config import ModelConfig
from daro_lab.models.tiny import load_pretrained
from daro_lab.models.warmstart import warm_start
from daro_lab.tasks import TaskConfig


def load_policy(cfg: ModelConfig, seed: int, task: TaskConfig | None = None):
    """(model, tokenizer): the local model at cfg.path, or the tiny preset warm-started with `seed`.

    `task` is the task the tiny preset is warm-started on (default TaskConfig(): 1-3 digit '+').
    """
    if cfg.path:
        return load_pretrained(cfg.path, cfg.dtype)
    return warm_start(cfg, task if task is not None else TaskConfig(), seed)
