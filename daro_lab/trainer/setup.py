"""Building what a run needs from its config, failing early (before any MLflow run exists)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daro_lab.algorithms import static_shape
from daro_lab.config import Config, ConfigError


@dataclass
class Components:
    model: Any
    tokenizer: Any
    task: Any
    train_set: list
    eval_set: list
    dropped: dict = field(default_factory=dict)  # {"train": n, "eval": n}: prompts left out as too long


def load_components(cfg: Config) -> Components:
    """Task problems, then the policy: a bad data file or model path fails here, naming itself. Every prompt is
    checked to encode and to fit the model's context (`check_prompts`)."""
    from daro_lab.tasks import build_task, get_task

    try:
        task = get_task(cfg.task.name)
        train_set, eval_set = build_task(cfg.task)
    except ConfigError:
        raise
    except ValueError as e:  # the built-in tasks' own checks of their settings
        raise ConfigError(f"task '{cfg.task.name}': {e}") from None
    if not train_set:
        raise ConfigError(f"task '{cfg.task.name}' has no training prompts")
    model, tokenizer = load_model_and_tokenizer(cfg)
    conf = getattr(model, "config", None)
    limit = prompt_token_limit(conf, cfg, cfg.rollout.max_new_tokens)
    dropped = {}
    train_set, dropped["train"] = check_prompts(train_set, tokenizer, limit, cfg.task.long_prompts, "training prompt")
    eval_set, dropped["eval"] = check_prompts(eval_set, tokenizer, limit, cfg.task.long_prompts, "held-out prompt")
    if not train_set:
        raise ConfigError(f"task '{cfg.task.name}': every training prompt is longer than {limit} tokens")
    if cfg.eval.benchmarks:  # evaluated during training: checked now, never dropped (that would change the benchmark)
        from daro_lab.eval.bench import load_benchmarks

        bench_limit = prompt_token_limit(conf, cfg, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
        for b in load_benchmarks(cfg.eval.benchmarks):
            check_prompts(b.problems, tokenizer, bench_limit, "error", f"benchmark {b.name} problem", BENCH_HINT)
    return Components(model, tokenizer, task, train_set, eval_set, {k: v for k, v in dropped.items() if v})


BENCH_HINT = "A benchmark is never cut down: shorten the responses (eval.max_new_tokens) or use a longer-context model"


def prompt_token_limit(model_config, cfg: Config, max_new_tokens: int) -> int | None:
    """The longest prompt, in tokens, that leaves room for `max_new_tokens` in the context of the model whose HF
    config is `model_config` (`task.max_prompt_tokens` when set); None when the model states no context length."""
    if cfg.task.max_prompt_tokens:
        return cfg.task.max_prompt_tokens
    context = next((v for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(v := getattr(model_config, k, None), int) and v > 0), None)
    if context is None:
        return None
    if context - max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens} (rollout.max_new_tokens, or eval.max_new_tokens for "
                          f"benchmarks) leaves no room for a prompt in the model's context of {context} positions")
    return context - max_new_tokens


def check_prompts(problems: list, tokenizer, limit: int | None, policy: str, what: str,
                  hint: str = "Set task.long_prompts=drop to leave them out, or shorten them") -> tuple[list, int]:
    """(the problems to use, how many were dropped). Every prompt must encode with `tokenizer` (its template
    included): a character the tokenizer lacks is a ConfigError naming it and the row. A prompt of more than
    `limit` tokens is, by `policy` (task.long_prompts): 'error', a ConfigError naming how many and the first
    rows; 'drop', left out (counted, and said on stderr)."""
    if not problems:
        return problems, 0
    lengths: list[int] = []
    for start in range(0, len(problems), 1024):
        chunk = problems[start : start + 1024]
        try:
            lengths += [len(ids) for ids in tokenizer.encode_prompts([p.prompt for p in chunk])]
        except ValueError:  # find the row, then say what is wrong with it
            for i, p in enumerate(chunk):
                try:
                    tokenizer.encode_prompts([p.prompt])
                except ValueError as e:
                    raise ConfigError(f"{_where(p, start + i, what)}: cannot be encoded: {_unencodable(p.prompt, e)}") from None
            raise
    if limit is None:
        return problems, 0
    long = [i for i, n in enumerate(lengths) if n > limit]
    if not long:
        return problems, 0
    first = "; ".join(f"{_where(problems[i], i, what)} ({lengths[i]} tokens, {len(problems[i].prompt)} characters)"
                      for i in long[:3])
    head = (f"{len(long)} of {len(problems)} {what}s are longer than {limit} tokens (the model's context less the "
            f"longest response, or task.max_prompt_tokens)")
    if policy != "drop":
        raise ConfigError(f"{head}: {first}{'; ...' if len(long) > 3 else ''}. {hint}")
    print(f"warning: {head}; dropped them (task.long_prompts=drop): {first}{'; ...' if len(long) > 3 else ''}",
          file=sys.stderr)
    skip = set(long)
    return [p for i, p in enumerate(problems) if i not in skip], len(long)


def _where(problem, index: int, what: str) -> str:
    return f"{what} {index + 1} ({getattr(problem, 'source', '') or repr(problem.prompt[:40])})"


def _unencodable(text: str, err: Exception) -> str:
    """Which character of `text` a tokenizer lacks, and where (CharTokenizer's UnknownCharacterError); else the error."""
    ch = getattr(err, "char", None)
    if not isinstance(ch, str) or len(ch) != 1:
        return str(err)
    pos = text.find(ch)
    at = f"at position {pos + 1}" if pos >= 0 else "(in the prompt template, model.prompt_template)"
    return f"character {ch!r} (U+{ord(ch):04X}) {at} is not in the tokenizer's vocabulary"


def load_model_and_tokenizer(cfg: Config):
    """The policy and the trainer-facing tokenizer: model.dtype 'auto' resolved for trainer.device
    (bfloat16 on CUDA, float32 on CPU), gradient checkpointing, prompt template and stop token applied."""
    import dataclasses

    from daro_lab.models import load_policy
    from daro_lab.models.prompting import prepare_policy, resolve_dtype

    mcfg = dataclasses.replace(cfg.model, dtype=resolve_dtype(cfg.model.dtype, cfg.trainer.device))
    model, tokenizer = load_policy(mcfg, cfg.model.init_seed, cfg.task)
    try:
        return prepare_policy(model, tokenizer, cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_engine(cfg: Config, model, tokenizer, dtype=None):
    """The rollout engine over `model`; dtype (torch): vLLM's compute dtype (default: the model's)."""
    if cfg.rollout.engine == "hf":
        from daro_lab.rollout.hf import HFEngine

        return HFEngine(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    if cfg.rollout.engine == "vllm":
        from daro_lab.rollout.vllm_engine import VLLMEngine, VLLMNotInstalledError, VLLMUnsupportedModelError

        try:  # colocated: vLLM is built from the live policy and receives its weights after every update
            return VLLMEngine(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=cfg.seed,
                              gpu_memory_utilization=cfg.rollout.vllm_gpu_memory,
                              dtype=str(dtype).removeprefix("torch.") if dtype is not None else None)
        except (VLLMNotInstalledError, VLLMUnsupportedModelError) as e:
            raise ConfigError(f"config key 'rollout.engine': {e}") from e
    raise ConfigError(f"config key 'rollout.engine': expected 'hf' or 'vllm', got {cfg.rollout.engine!r}")


def static_shape_weights(method: str, K: int) -> dict[int, float]:
    """{k: w} for 'shape:<method>': weights under which, at equal lengths and population std, each group's
    loss scale on DARO's path (the token-mean of |A| over the group, 2 sqrt(mu(1-mu)) at w = 1) is
    proportional to one prompt's loss scale under `method` (its static shape); normalised to mean 1.

    GRPO and DAPO give w = 1 (DARO's path with w = 1 already weighs each group like one GRPO prompt);
    Dr. GRPO and LIPO give w proportional to sqrt(mu(1-mu)). No frozen weights reproduce a baseline
    itself: a baseline weighs each group by its number of prompts, which changes every step.
    """
    shape = [float(static_shape(method, k / K, n_prompts=1, sigma_batch=1.0)) / (2 * math.sqrt(k / K * (1 - k / K)))
             for k in range(1, K)]
    mean = sum(shape) / len(shape)
    return {k: v / mean for k, v in enumerate(shape, start=1)}


def build_static_weights(cfg: Config) -> dict[int, float]:
    """The frozen weights of the 'static' method, {k: w} for k = 1..K-1, from `algo.daro.static`:
    'ones', 'shape:<method>' (`static_shape_weights`) or a JSON file {k: w} (e.g. a DARO run's final weights)."""
    K = cfg.rollout.num_responses
    spec = cfg.algo.daro.static
    if spec == "ones":
        return {k: 1.0 for k in range(1, K)}
    if spec.startswith("shape:"):
        return static_shape_weights(spec.removeprefix("shape:"), K)
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"config key 'algo.daro.static': {spec!r} is neither 'ones', 'shape:<method>', nor a file")
    try:
        data = json.loads(p.read_text())
        return {int(k): float(v) for k, v in data.items()}
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"config key 'algo.daro.static': {p} is not a JSON object {{k: weight}}: {e}") from e
