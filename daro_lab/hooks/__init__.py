"""Hooks observe the training loop and never change it.

The trainer calls every hook at fixed points with read-only views (detached tensors, metric dicts);
a hook records what it sees, through the tracker it was built with. Write your own by subclassing
`Hook` and overriding the events you need:

    class PrintReward(Hook):
        def on_step_end(self, step, metrics):
            print(step, metrics["reward/mean"])
"""

from daro_lab.hooks.base import Hook, MiniBatchView
from daro_lab.hooks.builtin import HoeffdingHook, MetricsHook, PerMuTableHook, SamplesHook, default_hooks

__all__ = ["Hook", "MiniBatchView", "HoeffdingHook", "MetricsHook", "PerMuTableHook", "SamplesHook", "default_hooks"]
