"""Benchmark of the synthetic testbed: 5 methods x 100 seeds x 150 steps on this machine (the target: under
10 minutes on 2 cores), and seconds per run and per step.

    python benchmarks/bench_testbed.py                 # 5 x 100 x 150, one worker per core
    python benchmarks/bench_testbed.py --seeds 20      # a quicker look

Methods: GRPO, DAPO, Dr. GRPO, LIPO and DARO (mass reading, C = auto, lr_w 1e-2), one cell (sharing 0, AdamW, uniform
levels, lengths learned), per-group gradient geometry every 10 steps as the grid runs it. It prints figures; it
asserts nothing. Run it on an idle machine: it reports the load average at its start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import daro_lab  # noqa: F401  (before torch: OpenMP's spin count, daro_lab/__init__.py)

# isort: split
import torch

from daro_lab.testbed.grid import Cell, run_grid
from daro_lab.testbed.model import TestbedConfig

METHODS = ("grpo", "dapo", "dr_grpo", "lipo", "daro-mass")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, cpus {os.cpu_count()}, workers {a.workers} "
        f"(1 torch thread each), load average {os.getloadavg()[0]:.2f}"
    )
    t0 = time.perf_counter()
    rows = run_grid([Cell()], list(METHODS), list(range(a.seeds)), TestbedConfig(steps=a.steps), workers=a.workers)
    dt = time.perf_counter() - t0
    runs = len(rows)
    print(
        f"{len(METHODS)} methods x {a.seeds} seeds x {a.steps} steps = {runs} runs in {dt:.1f} s "
        f"({dt / 60:.2f} min; target for 5 x 100 x 150 on 2 cores: under 10 min)"
    )
    print(
        f"  {dt * a.workers / runs:.3f} core-seconds per run, {1e3 * dt * a.workers / (runs * a.steps):.2f} "
        f"core-ms per step (pool start-up included)"
    )
    print(
        "  mean AUC by method (a sanity check, not a result): "
        + ", ".join(f"{m} {rows[rows.arm == m].auc.mean():.4f}" for m in METHODS)
    )


if __name__ == "__main__":
    main()
