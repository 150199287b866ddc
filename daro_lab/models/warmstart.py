"""Supervised warm start of the tiny preset on a built-in generated task (arithmetic, chain), cached on disk.

A randomly initialised policy never answers correctly, so RL has nothing to reinforce. A short
teacher-forced run on "<s>" + prompt + answer + "</s>" (loss on answer and eos tokens only) leaves
a policy that is right on some samples and wrong on others: pass rates spread over (0, 1).

The result is saved under `cache_dir/<key>/` (model + tokenizer via save_pretrained), where key is
sha256(warm-start recipe version, model config, task config, seed)[:16]; a second call loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from daro_lab.config import ModelConfig
from daro_lab.models.tiny import build_tiny_model, torch_dtype
from daro_lab.models.tokenizer import CharTokenizer
from daro_lab.tasks import Problem, TaskConfig, build_task, get_task

log = logging.getLogger(__name__)

RECIPE_VERSION = 4  # bump when the training recipe (or a task's problem sets) changes, so old caches are not reused
# torch threads of the warm start's training, whatever the calling process runs at: the thread count decides how some
# kernels split their sums, so a warm start trained at a load-dependent count (trainer.threads = 0) would depend on
# the machine's load when its cache was made (measured: 1 vs 2 threads differ by 4e-4 after 150 steps). One thread:
# the same warm start in a trainer, an ablation's prewarm or a parallel worker; 1.3x the 2-thread time on 2 cores.
WARMSTART_THREADS = 1
INFO_FILE = "warmstart.json"
GRAD_CLIP = 1.0  # max global gradient norm


# Fields that do not change the warm-started model (how it is run, or data-file options of other tasks);
# left out of the key so that, e.g., a different log-prob chunk size reuses the same cached model.
_MODEL_NOT_IN_KEY = (
    "path",
    "cache_dir",
    "prompt_template",
    "stop_token",
    "gradient_checkpointing",
    "logprob_chunk_size",
    "arch_file",
)
_TASK_NOT_IN_KEY = (
    "train_file",
    "eval_file",
    "prompt_field",
    "answer_field",
    "level_field",
    "answer_extract",
    "reward_workers",
    "reward_timeout_s",
    "max_prompt_tokens",
    "long_prompts",
    "level_mix",
)  # the warm start draws its own level-uniform demonstrations


def cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> str:
    """16 hex chars naming the warm-started model; `path`, `cache_dir` and run-time options do not change it."""
    m = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in _MODEL_NOT_IN_KEY}
    t = {k: v for k, v in dataclasses.asdict(task_cfg).items() if k not in _TASK_NOT_IN_KEY}
    blob = json.dumps({"recipe": RECIPE_VERSION, "model": m, "task": t, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> Path:
    return Path(model_cfg.cache_dir) / cache_key(model_cfg, task_cfg, seed)


def make_batch(
    problems: list[Problem], tok: CharTokenizer, targets: list[tuple[str, bool]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded teacher-forcing batch.

    targets: (text, stops) per problem, default (answer, True); a target that does not stop has no </s>.
    Returns input_ids (B, T): <s> prompt answer </s> <pad>..., and target_mask (B, T-1): True where
    input_ids[:, 1:] is an answer or eos token, i.e. where the next-token loss counts.
    """
    targets = targets or [(p.answer, True) for p in problems]
    prompts = tok.encode_prompts([p.prompt for p in problems])  # B x [<s> + prompt chars]
    answers = [
        ids[1:] + ([tok.eos_token_id] if stops else [])
        for ids, (_, stops) in zip(tok.encode_prompts([t for t, _ in targets]), targets)
    ]
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(problems), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(problems), T, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p) : len(p) + len(a)] = True
    return ids, mask[:, 1:]


def answer_loss(model: PreTrainedModel, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer + eos tokens; input_ids (B, T), target_mask (B, T-1).

    Right padding needs no attention mask: causal attention never lets a real token see a later pad.
    """
    logits = model(input_ids=input_ids).logits[:, :-1]  # (B, T-1, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
    return (nll * target_mask).sum() / target_mask.sum()


def train(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> tuple[PreTrainedModel, CharTokenizer, dict]:
    """Build the tiny model from `seed` and fit it for warmstart_steps at WARMSTART_THREADS torch threads (the
    caller's count is restored after); deterministic on one machine, whatever the caller's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(WARMSTART_THREADS)
    try:
        return _train(model_cfg, task_cfg, seed)
    finally:
        torch.set_num_threads(before)


@torch.enable_grad()  # trains even when called under torch.no_grad()
def _train(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> tuple[PreTrainedModel, CharTokenizer, dict]:
    """The warm start's training loop (`train`).

    Problems are drawn fresh each step (from a generator seeded by `seed`), never from the eval
    split, so held-out evaluation stays held out. Schedule: 5% linear warm-up, cosine to 10% of lr;
    gradients clipped to norm 1. Measured: lr 1e-3 fits far better than 2e-3 or 3e-3 in the same steps.
    """
    task = get_task(task_cfg.name)
    if task.sample is None or task.num_distinct is None:
        raise ValueError(
            f"the tiny preset is warm-started on a built-in generated task (arithmetic, chain), not {task_cfg.name!r}; "
            "set model.path to a local model for other tasks"
        )
    sample_problem, num_distinct = task.sample, task.num_distinct
    t0 = time.perf_counter()
    tok = CharTokenizer()
    # always train in fp32 (AdamW in bf16 loses small updates); warm_start loads in model_cfg.dtype
    model = build_tiny_model(dataclasses.replace(model_cfg, dtype="float32"), tok.vocab_size, seed)
    model.train()
    held_out = {p.prompt for p in build_task(task_cfg)[1]}
    if len(held_out) >= num_distinct(task_cfg):
        raise ValueError("warm start: every possible prompt of the task is in the eval split; nothing to train on")
    rng = random.Random(f"warmstart-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=model_cfg.warmstart_lr, betas=(0.9, 0.98), weight_decay=0.0)
    steps, warm = model_cfg.warmstart_steps, max(1, model_cfg.warmstart_steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    run_on = task.run_on if model_cfg.warmstart_run_on > 0 else None
    if model_cfg.warmstart_run_on > 0 and run_on is None:
        raise ValueError(f"model.warmstart_run_on: task {task_cfg.name!r} has no run-on demonstrations (only 'chain')")
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch: list[Problem] = []
        while len(batch) < model_cfg.warmstart_batch:
            p = sample_problem(rng, task_cfg)
            if p.prompt not in held_out:
                batch.append(p)
        targets = None
        if (
            run_on is not None
        ):  # a share of the demonstrations that lose count and do not stop, most at the hardest level
            targets = [
                (run_on(p, task_cfg), False)
                if rng.random() < model_cfg.warmstart_run_on * task.run_on_weight(p, task_cfg)
                else (p.answer, True)
                for p in batch
            ]
        input_ids, target_mask = make_batch(batch, tok, targets)
        for g in opt.param_groups:
            g["lr"] = model_cfg.warmstart_lr * lr_at(step)
        loss = answer_loss(model, input_ids, target_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
    model.eval()
    info = {
        "steps": steps,
        "final_loss": loss.item(),
        "seconds": time.perf_counter() - t0,
        "seed": seed,
        "threads": torch.get_num_threads(),
    }
    return model, tok, info


def warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> tuple[PreTrainedModel, CharTokenizer]:
    """(model, tokenizer) of the warm-started tiny preset: loaded from the cache, else trained and saved.

    The save goes to a temporary sibling directory renamed into place, so a crash or a concurrent
    run never leaves a half-written cache entry. Under torch.distributed (torchrun) rank 0 alone
    builds it and the other ranks wait: transformers' save_pretrained writes no model files on the
    other ranks, whose entry would otherwise win the rename with the tokenizer alone.
    """
    path = cache_path(model_cfg, task_cfg, seed)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (path / INFO_FILE).is_file() and (not dist or torch.distributed.get_rank() == 0):
        log.info("warm-starting the tiny preset (%d steps), cache %s", model_cfg.warmstart_steps, path)
        model, tok, info = train(model_cfg, task_cfg, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info["key"] = path.name
        info["model"] = dataclasses.asdict(model_cfg)
        info["task"] = dataclasses.asdict(task_cfg)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        try:
            os.replace(tmp, path)
        except OSError:  # another process saved the same key first (or a stale dir): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / INFO_FILE).is_file():
                raise
    if dist:
        torch.distributed.barrier()  # rank 0 has written the entry
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype(model_cfg.dtype))
    tok = CharTokenizer.from_pretrained(path)
    return model.eval(), tok


def warm_start_info(model_cfg: ModelConfig, task_cfg: TaskConfig, seed: int) -> dict | None:
    """The saved info (seconds, final loss, configs) of a cached warm start, or None if not cached."""
    f = cache_path(model_cfg, task_cfg, seed) / INFO_FILE
    return json.loads(f.read_text()) if f.is_file() else None
