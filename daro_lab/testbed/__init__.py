"""A testbed where a seed costs a second: a synthetic policy, trained by the real loss library (docs/math.md).

Each prompt has four answers, right or wrong and short or run-on, of known lengths; the policy is a softmax over
them, its logits a fixed start (the prompt's difficulty level) plus learned parameters that are the prompt's own,
shared by every prompt, or a mix (`sharing`: 0 gives orthogonal group gradients, 1 aligned ones). Its accuracy is
known exactly (no evaluation noise). One step samples K answers for N prompts, keeps 0 < mu < 1, computes the
advantages, and takes one on-policy update through `loss_terms` (every method of the registry, DARO's weights
included), with optional gradient clipping, AdamW or SGD. `grid.py` runs arms x seeds x cells and reports paired
differences of the area under the accuracy curve with their minimal detectable differences.

    from daro_lab.testbed import TestbedConfig, Arm, run_seed
    rec = run_seed(TestbedConfig(sharing=1.0), Arm("daro-mass", "daro", signal="mass"), seed=0)
"""

from daro_lab.testbed.loop import ARMS, Arm, RunRecord, run_seed
from daro_lab.testbed.model import RESPONSES, SyntheticPolicy, TestbedConfig

__all__ = ["ARMS", "Arm", "RESPONSES", "RunRecord", "SyntheticPolicy", "TestbedConfig", "run_seed"]
