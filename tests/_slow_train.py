"""`daro-lab train` with a hook that slows every step (hooks never change numbers), so that a test
can SIGKILL it mid-run. Under torchrun, rank 0 alone has hooks.

    python tests/_slow_train.py OVERRIDES...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_slow_train.py OVERRIDES...
"""

import sys
import time

from daro_lab.config import load_config
from daro_lab.hooks import Hook, default_hooks
from daro_lab.trainer import train


class Slow(Hook):
    def on_step_end(self, step, metrics):
        time.sleep(0.5)


if __name__ == "__main__":
    train(load_config(None, sys.argv[1:]), hooks=lambda t: default_hooks(t) + [Slow()], progress=False)
