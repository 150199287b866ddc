"""The RL loop (`loop.Trainer`), checkpoints, evaluation, and one MLflow-recorded run (`run.train`)."""

from daro_lab.trainer.loop import Trainer
from daro_lab.trainer.run import train

__all__ = ["Trainer", "train"]
