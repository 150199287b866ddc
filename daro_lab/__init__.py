"""daro-lab: the loss scale issue of GRPO-family losses, DARO, and the tools to study them."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP threads that wait for work spin for at most 1000 rounds before they sleep (libgomp's own default is 300,000,
# OMP_WAIT_POLICY=PASSIVE is 0). Beside a busy process a spinning thread holds its core while its partner is
# descheduled: on 2 cores a step ran 2.9-3.5x slower, with 1000 it runs 1.9-2.0x (a fair share is 2x) and idle steps
# are as fast (daro_lab/trainer/threads.py; `benchmarks/bench_trainer.py --busy --spin-counts`). libgomp reads it
# once, when torch loads: it takes effect when daro_lab is imported before torch (the CLI always is); a value the user
# set is kept.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")
SPINCOUNT = _os.environ.get("GOMP_SPINCOUNT")  # what this process runs with; None: libgomp's default (torch came first)
