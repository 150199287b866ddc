"""GPU smoke check: a few real DARO steps of the tiny preset on CUDA, no MLflow needed.

    python benchmarks/gpu_smoke.py [--steps 5] [--method daro]

Prints per-step reward, loss, time split and peak GPU memory; exits non-zero if a step fails.
This is not the issue-6 MFU check (a 1.5B-shaped model): it proves the loop runs on a GPU.
"""

import argparse
import time

import torch

from daro_lab.config import load_config
from daro_lab.trainer.loop import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--method", default="daro")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    cfg = load_config(
        None,
        [
            f"algo.method={a.method}",
            "trainer.device=cuda",
            "task.max_digits=2",
            "trainer.prompts_per_step=64",
            "trainer.mini_batch_prompts=32",
            "trainer.grad_norm_every=2",
            "model.warmstart_steps=300",
            "task.num_eval=64",
        ],
    )
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    print(
        f"{torch.cuda.get_device_name()} torch {torch.__version__}; setup (warm start) {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"policy on {next(tr.model.parameters()).device}, DARO weights on "
        f"{next(tr.weights.parameters()).device if tr.weights is not None else '-'}"
    )
    for _ in range(a.steps):
        m = tr.train_step()
        print(
            f"step {tr.step}: reward {m['reward/mean']:.3f} kept {m['rollout/kept_prompts']:.0f} "
            f"loss {m.get('loss/total', float('nan')):.4f} grad {m.get('grad/norm', float('nan')):.3f} "
            f"gen {m['time/generate']:.3f}s upd {m['time/update']:.3f}s"
        )
    ev, _ = tr.evaluate()
    print(
        f"eval greedy {ev['eval/greedy_acc']:.3f} sampled {ev['eval/sampled_acc']:.3f}; "
        f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
