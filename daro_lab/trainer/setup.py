"""Building what a run needs from its config, failing early (before any MLflow run exists)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daro_lab.algorithms import static_shape
from daro_lab.config import Config, ConfigError
from daro_lab.models.prompting import BENCH_HINT, check_prompts, prompt_token_limit


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
    if not cfg.model.path and cfg.task.long_prompts == "error":
        _check_tiny_prompts(cfg, train_set, eval_set)  # before the warm start, which takes minutes
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


def _check_tiny_prompts(cfg: Config, train_set: list, eval_set: list) -> None:
    """The tiny preset's prompts against its character tokenizer and context, known from the config alone."""
    from daro_lab.models.prompting import wrap_tokenizer
    from daro_lab.models.tiny import tiny_config
    from daro_lab.models.tokenizer import CharTokenizer

    tok = CharTokenizer()
    limit = prompt_token_limit(tiny_config(cfg.model, tok.vocab_size), cfg, cfg.rollout.max_new_tokens)
    wrapped = wrap_tokenizer(tok, cfg.model.prompt_template, cfg.model.stop_token)
    check_prompts(train_set, wrapped, limit, "error", "training prompt")
    check_prompts(eval_set, wrapped, limit, "error", "held-out prompt")


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
            return VLLMEngine(
                model,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                seed=cfg.seed,
                gpu_memory_utilization=cfg.rollout.vllm_gpu_memory,
                dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            )
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
    shape = [
        float(static_shape(method, k / K, n_prompts=1, sigma_batch=1.0)) / (2 * math.sqrt(k / K * (1 - k / K)))
        for k in range(1, K)
    ]
    mean = sum(shape) / len(shape)
    return {k: v / mean for k, v in enumerate(shape, start=1)}


def mass_fixed_point_weights(K: int) -> dict[int, float]:
    """{k: w} for 'shape:mass': the weights DARO with the 'mass' reading and C = 'auto' converges to at equal lengths
    (docs/math.md, section 4). At rho = 1 a group's token-mean of |A| is 2 mu(1-mu) / sigma_mu, proportional to
    sqrt(mu(1-mu)) for group-std advantages (population or unbiased std alike), so the fixed point w = C / mass_mu
    is proportional to 1 / sqrt(mu(1-mu)); C = 'auto' (the mean over groups of their signal) makes the harmonic mean
    of the weights 1. K = 8: w = 0.428 / sqrt(mu(1-mu))."""
    root = [math.sqrt(k / K * (1 - k / K)) for k in range(1, K)]
    mean = sum(root) / len(root)
    return {k: mean / r for k, r in enumerate(root, start=1)}


def build_static_weights(cfg: Config) -> dict[int, float]:
    """The frozen weights of the 'static' method, {k: w} for k = 1..K-1, from `algo.daro.static`:
    'ones', 'shape:<method>' (`static_shape_weights`), 'shape:mass' (DARO-mass's closed-form fixed point,
    `mass_fixed_point_weights`) or a JSON file {k: w} (e.g. a DARO run's final weights)."""
    K = cfg.rollout.num_responses
    spec = cfg.algo.daro.static
    if spec == "ones":
        return {k: 1.0 for k in range(1, K)}
    if spec == "shape:mass":
        return mass_fixed_point_weights(K)
    if spec.startswith("shape:"):
        return static_shape_weights(spec.removeprefix("shape:"), K)
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"config key 'algo.daro.static': {spec!r} is neither 'ones', 'shape:<method>', nor a file")
    where = f"config key 'algo.daro.static': {p}"
    try:
        data = json.loads(p.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"{where} is not a JSON object {{k: weight}}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a JSON object {{k: weight}}, it holds a {type(data).__name__}")
    weights = {}
    for key, v in data.items():
        try:
            k = int(key)
        except ValueError:
            raise ConfigError(f"{where}: key {key!r} is not a number of right answers k") from None
        if not 1 <= k <= K - 1:
            raise ConfigError(
                f"{where}: key {key!r} is outside k = 1..{K - 1} (K = rollout.num_responses = {K}): "
                "weights of a run with another K?"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: the weight of k = {key} must be a finite number > 0, got {v!r}")
        weights[k] = float(v)
    return weights
