"""Benchmark of the RL step on this machine: seconds per step and its split, tokens/s, peak memory,
and the cost of the hooks (same config, hooks on vs off, steps interleaved so all see the same load):
with MLflow metrics every step (tracking.log_every = 1, the default) and every 10 steps (TRL's
logging_steps); the per-mu tables hold every step either way.

    python benchmarks/bench_trainer.py                      # both presets
    python benchmarks/bench_trainer.py --preset trl --steps 40
    python benchmarks/bench_trainer.py --preset trl --vs-trl --steps 150   # and TRL's GRPOTrainer beside it
    python benchmarks/bench_trainer.py --preset none --vs-trl --steps 150  # the TRL comparison alone
    python benchmarks/bench_trainer.py --busy --steps 24    # beside one busy process, as a ratio to idle
    python benchmarks/bench_trainer.py --busy --steps 24 --spin-counts 300000,1000,0  # each in its own process

Presets:
  tiny  the demo preset (daro_lab/presets/demo.toml)
  trl   the workload of TRL's GRPOTrainer comparison: Qwen2 hidden 128, 2 layers, 4 heads, 2 KV heads,
        MLP 512, untied, fp32, 18-token character tokenizer; "a+b=" with 1-3 digit operands; 16 prompts x 8
        responses, at most 8 new tokens, temperature 1; token-mean (dapo) loss, no KL, one on-policy update
        per step, AdamW lr 1e-4 (built on the config defaults, not on the demo preset).

--vs-trl (needs the `trl` extra: pip install -e ".[trl]") runs TRL's GRPOTrainer on the `trl` workload in the same
process, its steps interleaved with daro-lab's (each TRL step, then one daro-lab step, same torch threads): the same
warm-started weights (a copy), tokenizer, prompt distribution, verifier, sampling (temperature 1, no top-k/top-p),
batch (16 prompts x 8, at most 8 new tokens), loss (dapo, eps 0.2 / 0.28, no KL), optimizer (AdamW lr 1e-4, constant
schedule, clip 1.0), fp32, no gradient checkpointing; TRL without any report_to, daro-lab with hooks off. It prints
seconds per step and per updated sequence: daro-lab updates only the prompts with 0 < mu < 1, TRL every completion.
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

import daro_lab  # noqa: E402, F401  (before torch: it sets OpenMP's spin count, daro_lab/__init__.py)

# isort: split
import torch  # noqa: E402

from daro_lab.config import load_config  # noqa: E402
from daro_lab.hooks import default_hooks  # noqa: E402
from daro_lab.trainer import Trainer  # noqa: E402
from daro_lab.trainer.loop import TORCH_THREADS  # noqa: E402

PRESETS = {
    "tiny": [],
    "trl": [
        "model.arch=qwen2",
        "model.hidden_size=128",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.intermediate_size=512",
        "model.tie_embeddings=false",
        "task.min_digits=1",
        "task.max_digits=3",
        "task.ops=['+']",
        "rollout.num_responses=8",
        "rollout.max_new_tokens=8",
        "rollout.temperature=1.0",
        "algo.method=dapo",
        "algo.kl_beta=0.0",
        "trainer.prompts_per_step=16",
        "trainer.mini_batch_prompts=16",
        "trainer.lr=1e-4",
    ],
}


DEMO = Path(__file__).resolve().parents[1] / "daro_lab/presets/demo.toml"


def base_config(preset: str):
    """The preset's base: the demo preset for `tiny`, the config defaults for `trl` (its workload is fixed)."""
    return DEMO if preset == "tiny" else None


def bench(preset: str, steps: int, warmup: int, threads: int) -> None:
    from daro_lab.tracking import Tracker

    torch.set_num_threads(threads)
    overrides = [*PRESETS[preset], "trainer.grad_norm_every=0", f"trainer.steps={steps + warmup}"]
    cfg = load_config(base_config(preset), overrides)
    tmp = tempfile.mkdtemp()
    trackers = {
        every: Tracker.start(
            f"sqlite:///{tmp}/mlflow.db",
            "bench",
            f"{preset}-log-every-{every}",
            cfg.flat(),
            cfg.to_json(),
            artifact_location=f"{tmp}/artifacts",
            context_tags=False,
        )
        for every in (1, 10)
    }
    on = Trainer(cfg, hooks=default_hooks(trackers[1]))
    cfg10 = load_config(base_config(preset), [*overrides, "tracking.log_every=10"])
    on10 = Trainer(cfg10, hooks=default_hooks(trackers[10]))
    for tr in (on, on10):
        for h in tr.hooks:
            h.on_train_start(tr)
    off = Trainer(cfg, hooks=[])
    gcfg = load_config(
        base_config(preset), [*overrides[:-2], "trainer.grad_norm_every=1", f"trainer.steps={steps + warmup}"]
    )
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
    print(
        f"  s/step, hooks on (incl. amortised MLflow flush): {on_total:.4f}  (median {statistics.median(times['on']):.4f})"
    )
    print(
        f"  s/step, hooks off:                               {mean['off']:.4f}  (median {statistics.median(times['off']):.4f})"
    )
    print(f"  hooks overhead, on/off ratio:                    {on_total / mean['off']:.3f}")
    print(
        f"  s/step, hooks on, MLflow metrics every 10 steps: {on10_total:.4f}  (median {statistics.median(times['on10']):.4f})"
    )
    print(f"  hooks overhead at log_every=10, on/off ratio:    {on10_total / mean['off']:.3f}")
    print(
        f"  final flush (pending metrics, parquet tables):   {flush[1]:.3f} s / {flush[10]:.3f} s at log_every 1 / 10"
    )
    print(
        f"  G_mu every step (no hooks), ratio to off:        {mean['g'] / mean['off']:.3f}  (sampled every n steps in training)"
    )
    for k, v in split.items():
        print(f"  {k:32s} {statistics.mean(v):.4f} s  ({100 * statistics.mean(v) / mean['on']:.0f}%)")
    print(f"  response tokens/s (hooks on):                    {statistics.mean(toks) / mean['on']:.0f}")
    print(
        f"  kept prompts per step (0 < mu < 1):              {statistics.mean(kept):.1f} of {cfg.trainer.prompts_per_step}"
    )
    print(f"  peak resident memory of this process:            {peak_mb:.0f} MiB")


def _spread(xs: list[float]) -> str:
    """'mean 0.2292, median 0.2298, p10-p90 0.2201-0.2410, max 0.4120' of step times in seconds."""
    q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else [xs[0]] * 9
    return (
        f"mean {statistics.mean(xs):.4f}, median {statistics.median(xs):.4f}, p10-p90 {q[0]:.4f}-{q[-1]:.4f}, "
        f"max {max(xs):.4f}"
    )


def bench_vs_trl(steps: int, warmup: int, threads: int) -> None:
    """TRL's GRPOTrainer and daro-lab's trainer on the `trl` workload, steps interleaved (module docstring)."""
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit('--vs-trl needs TRL: pip install -e ".[trl]"')
    import copy
    import logging

    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    cfg = load_config(
        base_config("trl"), [*PRESETS["trl"], "trainer.grad_norm_every=0", f"trainer.steps={steps + warmup}"]
    )
    ours = Trainer(cfg, hooks=[])
    K, P = cfg.rollout.num_responses, cfg.trainer.prompts_per_step
    reward_batch = ours.task.reward_batch
    data = Dataset.from_dict(
        {"prompt": [p.prompt for p in ours.train_set], "answer": [p.answer for p in ours.train_set]}
    )

    def verifier(completions, answer, **kwargs):
        return reward_batch(list(completions), list(answer))

    tmp = tempfile.mkdtemp()
    args = GRPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=P * K,
        gradient_accumulation_steps=1,
        num_generations=K,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=1.0,
        loss_type="dapo",
        beta=0.0,
        epsilon=cfg.algo.eps_low,
        epsilon_high=cfg.algo.eps_high,
        learning_rate=cfg.trainer.lr,
        lr_scheduler_type="constant",
        weight_decay=cfg.trainer.weight_decay,
        adam_beta1=cfg.trainer.betas[0],
        adam_beta2=cfg.trainer.betas[1],
        max_grad_norm=cfg.trainer.grad_clip,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        max_steps=steps + warmup,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    times: dict[str, list[float]] = {"trl": [], "ours": []}
    kept: list[float] = []

    class Interleave(TrainerCallback):
        """Times each TRL step (on_step_begin .. on_step_end: generation, rewards, loss, backward, clip, AdamW),
        then runs and times one daro-lab step before TRL's next."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.t0
            t0 = time.perf_counter()
            m = ours.train_step()
            dt_ours = time.perf_counter() - t0
            if state.global_step > warmup:
                times["trl"].append(dt)
                times["ours"].append(dt_ours)
                kept.append(m["rollout/kept_prompts"])

    theirs = GRPOTrainer(
        model=copy.deepcopy(ours.model),
        reward_funcs=verifier,
        args=args,
        train_dataset=data,
        processing_class=ours.tokenizer,
        callbacks=[Interleave()],
    )
    from transformers.trainer_callback import PrinterCallback

    theirs.remove_callback(PrinterCallback)  # TRL's logs stay in its log_history, not on stdout
    load0 = os.getloadavg()[0]
    theirs.train()
    load1 = os.getloadavg()[0]
    zero_std = [h["frac_reward_zero_std"] for h in theirs.state.log_history if "frac_reward_zero_std" in h]
    t_trl, t_ours = statistics.mean(times["trl"]), statistics.mean(times["ours"])
    n_trl = P * K  # TRL updates every completion (those of mu in {0, 1} prompts with advantage 0)
    n_ours = statistics.mean(kept) * K
    n_signal_trl = (1 - statistics.mean(zero_std)) * P * K if zero_std else float("nan")
    print(
        f"\n== daro-lab vs TRL {trl.__version__} GRPOTrainer, `trl` workload: {len(times['trl'])} timed steps of each "
        f"after {warmup} warm-up, interleaved, torch threads {torch.get_num_threads()}"
    )
    print(
        f"  load average (1 min) at start / end:             {load0:.2f} / {load1:.2f}  (2 cores: above 2, other work shares them)"
    )
    print("  s/step: mean, median, 10th-90th percentile, max (a few slow steps can pull a mean far above the median)")
    print(f"  s/step, TRL GRPOTrainer (report_to none):        {_spread(times['trl'])}")
    print(f"  s/step, daro-lab (hooks off):                    {_spread(times['ours'])}")
    m_trl, m_ours = statistics.median(times["trl"]), statistics.median(times["ours"])
    print(
        f"  ratio daro-lab / TRL, per step:                  {t_ours / t_trl:.3f} of the means, {m_ours / m_trl:.3f} of the medians"
    )
    print(
        f"  sequences updated per step, TRL:                 {n_trl}  (with a non-zero advantage: {n_signal_trl:.1f})"
    )
    print(f"  sequences updated per step, daro-lab:            {n_ours:.1f}  (the prompts with 0 < mu < 1, x {K})")
    print(f"  ms per updated sequence, TRL:                    {1e3 * t_trl / n_trl:.3f}")
    print(f"  ms per updated sequence, daro-lab:               {1e3 * t_ours / n_ours:.3f}")
    print(f"  ratio daro-lab / TRL, per updated sequence:      {(t_ours / n_ours) / (t_trl / n_trl):.3f}")
    if zero_std:
        print(
            f"  ms per sequence with a non-zero advantage, TRL:  {1e3 * t_trl / n_signal_trl:.3f}  "
            f"(ratio daro-lab / TRL {(t_ours / n_ours) / (t_trl / n_signal_trl):.3f})"
        )


def bench_busy(preset: str, blocks: int, per_block: int) -> None:
    """Step time beside one busy process (`python -c "while True: pass"`), as a ratio to idle, at the default
    trainer.threads = 0 (the cores other processes leave free when the run starts, trainer/threads.py): a trainer
    built on the idle machine and one built beside the busy process, blocks of idle and busy steps interleaved in
    this one run, both trainers stepped in each block so they see the same load. The idle-built trainer beside the
    busy process is what a run sees when the load arrives after it started (its count is fixed for the run). A fair
    share of 2 cores is 2x."""
    import subprocess

    overrides = [*PRESETS[preset], "trainer.grad_norm_every=0", f"trainer.steps={10 * blocks * per_block}"]

    def hog():
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])

    idle_built = Trainer(load_config(base_config(preset), overrides), hooks=[])
    h = hog()
    try:
        time.sleep(0.5)
        busy_built = Trainer(load_config(base_config(preset), overrides), hooks=[])
    finally:
        h.kill()
        h.wait()
    arms = {
        f"started idle ({idle_built.cfg.trainer.threads} threads)": idle_built,
        f"started beside it ({busy_built.cfg.trainer.threads} thread(s))": busy_built,
    }
    for tr in arms.values():  # warm-up
        torch.set_num_threads(tr.cfg.trainer.threads)
        tr.train_step()
    times = {(a, mode): [] for a in arms for mode in ("idle", "busy")}
    for _ in range(blocks):
        for mode in ("idle", "busy"):
            h = hog() if mode == "busy" else None
            try:
                time.sleep(0.3)
                for _ in range(per_block):
                    for name, tr in arms.items():
                        torch.set_num_threads(tr.cfg.trainer.threads)  # global in torch: each trainer its own
                        t0 = time.perf_counter()
                        tr.train_step()
                        times[(name, mode)].append(time.perf_counter() - t0)
            finally:
                if h is not None:
                    h.kill()
                    h.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[(next(iter(arms)), "idle")]
    cores = os.cpu_count() or 1
    print(
        f"\n== preset {preset} beside one busy process: {blocks} blocks of {per_block} steps each idle and busy, "
        f"interleaved; cpus {cores}, torch threads by default {TORCH_THREADS}, GOMP_SPINCOUNT "
        f"{daro_lab.SPINCOUNT or 'unset (300000)'} (a fair share is {cores / max(1, cores - 1):.1f}x)"
    )
    for name in arms:
        print(
            f"  {name:34s} idle {med[(name, 'idle')]:.3f} s/step, busy {med[(name, 'busy')]:.3f} s/step (medians; "
            f"means {statistics.mean(times[(name, 'idle')]):.3f} / {statistics.mean(times[(name, 'busy')]):.3f}); "
            f"busy / the idle run's idle {med[(name, 'busy')] / ref:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset",
        choices=[*PRESETS, "all", "none"],
        default="all",
        help="the hooks benchmark of one preset, both (all), or none (with --vs-trl: the comparison only)",
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--busy",
        action="store_true",
        help="the step time beside one busy process, as a ratio to idle (tiny preset, or --preset)",
    )
    ap.add_argument(
        "--spin-counts",
        default="",
        help="with --busy: run it once per GOMP_SPINCOUNT in this comma list, each in its own process "
        "(libgomp reads it when torch loads); libgomp's default is 300000, daro-lab's 1000, PASSIVE 0",
    )
    ap.add_argument(
        "--vs-trl",
        action="store_true",
        help='also run TRL\'s GRPOTrainer on the `trl` workload, interleaved (needs pip install -e ".[trl]")',
    )
    a = ap.parse_args()
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if a.busy and a.spin_counts:
        import subprocess

        for v in a.spin_counts.split(","):
            if not v.strip().isdigit():
                sys.exit(f"--spin-counts: {v!r} is not a non-negative integer")
        for v in a.spin_counts.split(","):
            sys.stdout.flush()
            subprocess.run(
                [sys.executable, __file__, "--busy", "--steps", str(a.steps), "--preset", a.preset],
                env={**os.environ, "GOMP_SPINCOUNT": v.strip()},
                check=True,
            )
        return
    if a.busy:
        bench_busy("tiny" if a.preset in ("all", "none") else a.preset, blocks=4, per_block=max(1, a.steps // 8))
        return
    for p in PRESETS if a.preset == "all" else [] if a.preset == "none" else [a.preset]:
        bench(p, a.steps, a.warmup, a.threads)
    if a.vs_trl:
        bench_vs_trl(a.steps, a.warmup, a.threads)


if __name__ == "__main__":
    main()
