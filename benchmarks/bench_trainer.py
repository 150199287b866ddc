"""Benchmark of the RL step on this machine: seconds per step and its split, tokens/s, peak memory,
and the cost of the hooks (same config, hooks on vs off, steps interleaved so all see the same load):
with MLflow metrics every step (tracking.log_every = 1, the default) and every 10 steps (TRL's
logging_steps); the per-mu tables hold every step either way.

    python benchmarks/bench_trainer.py                      # both presets
    python benchmarks/bench_trainer.py --preset trl --steps 40

Presets:
  tiny  the demo preset (Llama, warm-started, 16 prompts x 8, two mini-batches per step)
  trl   the workload of TRL's GRPOTrainer reference (1.16: about 0.10 s/step on this machine,
        2 threads, idle): Qwen2 hidden 128, 2 layers, 4 heads, 2 KV heads, MLP 512, untied, fp32,
        20-token character tokenizer; "a+b=" with 1-3 digit operands; 16 prompts x 8 responses,
        at most 8 new tokens, temperature 1; token-mean (dapo) loss, no KL, one on-policy update
        per step, AdamW lr 1e-4.
It prints figures; it asserts nothing. Compare ratios measured in one run, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from daro_lab.config import load_config  # noqa: E402
from daro_lab.hooks import default_hooks  # noqa: E402
from daro_lab.trainer import Trainer  # noqa: E402

PRESETS = {
    "tiny": [],
    "trl": [
        "model.arch=qwen2", "model.hidden_size=128", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.intermediate_size=512", "model.tie_embeddings=false",
        "task.min_digits=1", "task.max_digits=3", "task.ops=['+']", "rollout.num_responses=8",
        "rollout.max_new_tokens=8", "rollout.temperature=1.0", "algo.method=dapo", "algo.kl_beta=0.0",
        "trainer.prompts_per_step=16", "trainer.mini_batch_prompts=16", "trainer.lr=1e-4",
    ],
}


def bench(preset: str, steps: int, warmup: int, threads: int) -> None:
    from daro_lab.tracking import Tracker

    torch.set_num_threads(threads)
    overrides = [*PRESETS[preset], "trainer.grad_norm_every=0", f"trainer.steps={steps + warmup}"]
    cfg = load_config(Path(__file__).resolve().parents[1] / "daro_lab/presets/demo.toml", overrides)
    tmp = tempfile.mkdtemp()
    trackers = {every: Tracker.start(f"sqlite:///{tmp}/mlflow.db", "bench", f"{preset}-log-every-{every}", cfg.flat(),
                                     cfg.to_json(), artifact_location=f"{tmp}/artifacts", context_tags=False)
                for every in (1, 10)}
    on = Trainer(cfg, hooks=default_hooks(trackers[1]))
    cfg10 = load_config(Path(__file__).resolve().parents[1] / "daro_lab/presets/demo.toml",
                        [*overrides, "tracking.log_every=10"])
    on10 = Trainer(cfg10, hooks=default_hooks(trackers[10]))
    for tr in (on, on10):
        for h in tr.hooks:
            h.on_train_start(tr)
    off = Trainer(cfg, hooks=[])
    gcfg = load_config(Path(__file__).resolve().parents[1] / "daro_lab/presets/demo.toml",
                       [*overrides[:-2], "trainer.grad_norm_every=1", f"trainer.steps={steps + warmup}"])
    with_g = Trainer(gcfg, hooks=[])
    times: dict[str, list[float]] = {"on": [], "on10": [], "off": [], "g": []}
    split: dict[str, list[float]] = {"time/generate": [], "time/old_logprobs": [], "time/update": []}
    toks, kept = [], []
    for i in range(steps + warmup):
        for name, tr in (("off", off), ("on", on), ("on10", on10), ("g", with_g)):
            t0 = time.perf_counter()
            m = tr.train_step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
                if name == "on":
                    for k in split:
                        split[k].append(m[k])
                    toks.append(m["perf/tokens_per_s"] * m["time/step"])
                    kept.append(m["rollout/kept_prompts"])
    flush = {}
    for every, tracker in trackers.items():  # the hooks' deferred MLflow writes count against the hooks
        t0 = time.perf_counter()
        for h in (on if every == 1 else on10).hooks:
            h.on_train_end(steps + warmup, "FINISHED")
        tracker.finish()
        flush[every] = time.perf_counter() - t0
    mean = {k: statistics.mean(v) for k, v in times.items()}
    on_total = mean["on"] + flush[1] / steps
    on10_total = mean["on10"] + flush[10] / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n== preset {preset}: {steps} timed steps after {warmup} warm-up, torch threads {torch.get_num_threads()}")
    print(f"  s/step, hooks on (incl. amortised MLflow flush): {on_total:.4f}  (median {statistics.median(times['on']):.4f})")
    print(f"  s/step, hooks off:                               {mean['off']:.4f}  (median {statistics.median(times['off']):.4f})")
    print(f"  hooks overhead, on/off ratio:                    {on_total / mean['off']:.3f}")
    print(f"  s/step, hooks on, MLflow metrics every 10 steps: {on10_total:.4f}  (median {statistics.median(times['on10']):.4f})")
    print(f"  hooks overhead at log_every=10, on/off ratio:    {on10_total / mean['off']:.3f}")
    print(f"  final flush (pending metrics, parquet tables):   {flush[1]:.3f} s / {flush[10]:.3f} s at log_every 1 / 10")
    print(f"  G_mu every step (no hooks), ratio to off:        {mean['g'] / mean['off']:.3f}  (sampled every n steps in training)")
    for k, v in split.items():
        print(f"  {k:32s} {statistics.mean(v):.4f} s  ({100 * statistics.mean(v) / mean['on']:.0f}%)")
    print(f"  response tokens/s (hooks on):                    {statistics.mean(toks) / mean['on']:.0f}")
    print(f"  kept prompts per step (0 < mu < 1):              {statistics.mean(kept):.1f} of {cfg.trainer.prompts_per_step}")
    print(f"  peak resident memory of this process:            {peak_mb:.0f} MiB")
    if preset == "trl":
        print(f"  TRL GRPOTrainer 1.16 reference on this workload: 0.10 s/step -> ratio {on_total / 0.10:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for p in PRESETS if a.preset == "all" else [a.preset]:
        bench(p, a.steps, a.warmup, a.threads)


if __name__ == "__main__":
    main()
