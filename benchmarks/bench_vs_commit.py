"""The demo preset's step time on this tree beside another commit's, in one run: "no slower than before".

    python benchmarks/bench_vs_commit.py 7fe79c7              # 5 rounds of 12 steps each, hooks off
    python benchmarks/bench_vs_commit.py HEAD~3 --grad-norm-every 1

The other commit is checked out into a temporary git worktree; each round runs one process per tree (alternating
which goes first), each building the demo-preset trainer (seed 0, trainer.threads 2) and timing `train_step` after
2 warm-up steps. It prints each tree's median step time over all rounds and their ratio, with the load average; it
asserts nothing. Compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
import daro_lab, torch
from daro_lab.config import load_config
from daro_lab.trainer import Trainer
steps, every = int(sys.argv[1]), int(sys.argv[2])
cfg = load_config(sys.argv[3], ["trainer.threads=2", f"trainer.grad_norm_every={every}", f"trainer.steps={steps + 2}"])
tr = Trainer(cfg, hooks=[])
for _ in range(2):
    tr.train_step()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); tr.train_step(); times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commit", help="the commit to compare with (e.g. the one before a change)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--grad-norm-every", type=int, default=0, help="0: no G_mu steps (the preset's own is 10)")
    a = ap.parse_args()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), a.commit],
            check=True,
            capture_output=True,
        )
        try:
            trees = {f"this tree ({head}, with its changes)": ROOT, f"commit {a.commit}": other}
            times = {name: [] for name in trees}
            print(
                f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; "
                f"{a.rounds} rounds x {a.steps} steps, grad_norm_every {a.grad_norm_every}"
            )
            for r in range(a.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_DISABLE_TELEMETRY": "true"}
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            CHILD,
                            str(a.steps),
                            str(a.grad_norm_every),
                            str(tree / "daro_lab/presets/demo.toml"),
                        ],
                        env=env,
                        cwd=tree,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    times[name] += json.loads(out.stdout.strip().splitlines()[-1])
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, m in med.items():
                print(f"  {name:40s} median {m:.4f} s/step over {len(times[name])} steps")
            first, second = med.values()
            print(f"  ratio this tree / {a.commit}: {first / second:.3f}   (load average now {os.getloadavg()[0]:.2f})")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)


if __name__ == "__main__":
    main()
