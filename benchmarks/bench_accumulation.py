"""Benchmark of gradient accumulation: what splitting a mini-batch into passes costs, per method.

A mini-batch split into passes (`trainer.micro_batch_prompts`) needs the whole mini-batch's totals before any
pass's loss. A method without weights (GRPO, DAPO, Dr. GRPO, LIPO) counts them from the masks; DARO's weights read
the mini-batch's L_mu, so DARO first runs every pass forward without grad. This times `Trainer.update` on the same
scored rollouts, one pass vs passes of `--micro` prompts, for DAPO and DARO, the four configurations' updates
interleaved so that all see the same load, and prints seconds per update and the ratio split / one pass per
method. It prints figures; it asserts nothing. Compare the ratios, measured in one run, not absolute times.

    python benchmarks/bench_accumulation.py                   # the demo preset, 32 prompts x 8, passes of 4
    python benchmarks/bench_accumulation.py --reps 20 --micro 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from daro_lab.config import load_config  # noqa: E402
from daro_lab.trainer import Trainer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "daro_lab/presets/demo.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12, help="timed updates per configuration (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step (one mini-batch)")
    ap.add_argument("--micro", type=int, default=4, help="prompts per pass when the mini-batch is split")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = [
        f"trainer.prompts_per_step={a.prompts}",
        f"trainer.mini_batch_prompts={a.prompts}",
        "trainer.grad_norm_every=0",
        f"trainer.threads={a.threads}",
    ]  # the warm start: the demo's cache
    configs = {
        (m, micro): load_config(DEMO, base + [f"algo.method={m}", f"trainer.micro_batch_prompts={micro}"])
        for m in ("dapo", "daro")
        for micro in (0, a.micro)
    }
    trainers = {key: Trainer(cfg) for key, cfg in configs.items()}
    # one batch of scored rollouts, the same for every configuration (the policies start equal)
    first = trainers[("dapo", 0)]
    problems = first.next_problems(a.prompts)
    roll, rewards, _ = first.generate(problems)
    kept = int(((rewards.mean(1) > 0) & (rewards.mean(1) < 1)).sum())
    times: dict[tuple[str, int], list[float]] = {key: [] for key in trainers}
    for rep in range(a.reps + 1):
        for key, tr in trainers.items():
            t0 = time.perf_counter()
            tr.update(rep + 1, roll, rewards)
            if rep:  # the first update warms up
                times[key].append(time.perf_counter() - t0)
    K = first.K
    print(
        f"cpu; torch {torch.__version__}; {torch.get_num_threads()} threads; demo preset; one mini-batch of "
        f"{a.prompts} prompts x {K} ({kept} kept), {a.reps} updates each, interleaved"
    )
    for m in ("dapo", "daro"):
        one, split = statistics.median(times[(m, 0)]), statistics.median(times[(m, a.micro)])
        n_pass = -(-kept // a.micro)
        print(
            f"{m:5s} one pass {one:.3f} s/update; {n_pass} passes of {a.micro} prompts {split:.3f} s/update; "
            f"split / one pass {split / one:.2f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
