"""Typed experiment configuration: dataclasses loaded from TOML, overridden by `--set a.b=v`.

Every field has one line of help; where a default comes from the DARO paper (arXiv 2510.09001), the
design document (DESIGN.md) or another paper, the help says so. `load_config` rejects unknown keys
and wrong types with an error naming the key, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - `help` reads best here
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str = _f("", "local Hugging Face model directory; empty builds the tiny preset from this section")
    arch: str = _f("llama", "tiny preset: architecture, 'llama' or 'qwen2'")
    init_seed: int = _f(0, "tiny preset: seed of its initialisation and warm start (shared by every training seed)")
    hidden_size: int = _f(64, "tiny preset: hidden size of the Llama-architecture model")
    num_layers: int = _f(2, "tiny preset: number of decoder layers")
    num_heads: int = _f(4, "tiny preset: attention heads")
    num_kv_heads: int = _f(2, "tiny preset: key/value heads (grouped-query attention)")
    intermediate_size: int = _f(256, "tiny preset: MLP width")
    tie_embeddings: bool = _f(False, "tiny preset: tie input and output embeddings")
    dtype: str = _f("float32", "parameter dtype: float32, bfloat16, float16, or 'auto' (bfloat16 on GPU, float32 on CPU; issue 6)")
    warmstart_steps: int = _f(1200, "tiny preset: supervised warm-start steps, so pass rates spread over (0, 1)")
    warmstart_lr: float = _f(1e-3, "tiny preset: warm-start learning rate")
    warmstart_batch: int = _f(64, "tiny preset: warm-start batch size")
    warmstart_run_on: float = _f(0.0, "tiny preset, chain task: share of warm-start demonstrations (scaled by level, this at the "
                                 "hardest) that lose count and run on without stopping, the failure mode of long wrong "
                                 "answers; 0: every demonstration stops")
    cache_dir: str = _f(".daro_cache", "where warm-started tiny models are cached, keyed by a hash of their config")
    prompt_template: str = _f("plain", "'plain' ({prompt}), 'qwen_math' (Qwen2.5-Math's boxed CoT prompt, QwenLM/Qwen2.5-Math evaluation), 'chat' (the tokenizer's chat template), or a string with {prompt}")
    stop_token: str = _f("", "token that ends a response; empty: '<|im_end|>' or '<|eot_id|>' when the prompt uses it, else the tokenizer's eos")
    gradient_checkpointing: bool = _f(False, "recompute decoder-layer activations in backward: less memory, ~1/3 more compute (off: the tiny preset needs none)")
    logprob_chunk_size: int = _f(0, "tokens per lm_head + fp32 log-softmax chunk in the trainer's log-probs; 0 unchunked (fine at the tiny preset's 18 tokens; 150k vocabularies need it, issue 6)")
    arch_file: str = _f("", "HF config.json of the architecture, for `train --dry-run` when model.path has none (experiments/paper/arch/)")


@dataclass
class TaskConfig:
    name: str = _f("arithmetic", "'arithmetic' or 'chain' (built in), 'math' (data files, math-verify on the last \\boxed{}) or 'file' (data files, exact match)")
    min_digits: int = _f(1, "arithmetic, chain: fewest digits of an operand")
    max_digits: int = _f(3, "arithmetic, chain: most digits of an operand; arithmetic: more digits, harder and longer answers")
    ops: list[str] = _f(["+"], "arithmetic: operations drawn from ('+', '-', '*')")
    min_terms: int = _f(2, "chain: fewest operands (the answer lists the partial sums after the first)")
    max_terms: int = _f(5, "chain: most operands; more operands, harder and longer answers")
    num_train: int = _f(4096, "number of training prompts (math/file tasks: at most this many rows, drawn by data_seed; 0 = all)")
    num_eval: int = _f(256, "number of held-out prompts for periodic evaluation (math/file tasks: at most; 0 = all)")
    data_seed: int = _f(1234, "seed of the prompt generator (independent of the training seed)")
    train_file: str = _f("", "math/file tasks: local JSONL or parquet of training problems (MATH, DAPO-Math-17k, OpenR1-Math layouts)")
    eval_file: str = _f("", "math/file tasks: held-out problems; empty holds out num_eval rows of train_file")
    prompt_field: str = _f("", "field of the problem text, dotted for nesting ('a.b.0'); empty: first of problem, prompt, question")
    answer_field: str = _f("", "field of the answer, dotted (DAPO-Math-17k: reward_model.ground_truth); empty: first of answer, reward_model.ground_truth, solution, ground_truth")
    level_field: str = _f("", "optional difficulty field ('Level 3' -> 3); empty: 'level' when the row has it, else 0")
    answer_extract: str = _f("auto", "'boxed': the last \\boxed{} of the answer field (MATH solutions); 'none': as is; 'auto': boxed when it has one")
    reward_workers: int = _f(2, "math task: processes verifying answers with math-verify, 2 for the 2-core default machine (DESIGN.md); 0: in-process, no hard timeout")
    reward_timeout_s: float = _f(5.0, "math task: seconds per answer before it scores 0 (math-verify's own per-call default is 5 s)")


@dataclass
class RolloutConfig:
    engine: str = _f("hf", "rollout engine: 'hf' (transformers) or 'vllm'")
    num_responses: int = _f(8, "K, responses sampled per prompt (paper: 8)")
    max_new_tokens: int = _f(8, "longest response; also Dr. GRPO's constant normaliser L_max")
    temperature: float = _f(1.0, "sampling temperature (paper setup: 1.0)")
    top_p: float = _f(1.0, "nucleus sampling threshold; 1.0 disables it")
    vllm_gpu_memory: float = _f(0.3, "engine 'vllm': fraction of the GPU's memory vLLM holds for its weights and KV cache "
                                "beside the trainer (vLLM's gpu_memory_utilization; colocated as in verl)")


@dataclass
class DaroConfig:
    lr_w: float = _f(1e-3, "learning rate of the DARO weights (paper: 1e-3), own AdamW group, no weight decay")
    param: str = _f("log", "weight parametrisation: 'log' (w = exp(s)) or 'direct' (w clamped to bounds) (DESIGN.md)")
    signal: str = _f("abs", "what drives w (w-gradient signal - C/w, fixed point w = C/signal): 'abs' |L_mu| (docs/math.md), "
                     "'signed' L_mu (paper-literal), 'grad' ||grad L_mu||, 'mass' token-mean of |A| g (the group's loss "
                     "mass before advantages of opposite sign cancel)")
    reg: float | str = _f(1.0, "C of the regulariser sum_mu (w L_mu - C ln w_mu): a number (1.0 = the paper's), or 'auto': the "
                          "running mean (bias-corrected EMA, decay 0.99) of the present groups' mean signal, so that the "
                          "weights' geometric centre stays near 1")
    signal_ema: float = _f(0.0, "decay of a per-group, bias-corrected EMA of the signal across updates (0: each mini-batch's "
                           "own signal, the paper's reading)")
    w_min: float = _f(1e-3, "lower bound of every weight (DESIGN.md)")
    w_max: float = _f(1e3, "upper bound of every weight (DESIGN.md)")
    init: float = _f(1.0, "initial value of every weight")
    static: str = _f("ones", "frozen weights of the 'static' method: 'ones'; 'shape:<method>' (grpo, dapo, dr_grpo, lipo): w "
                     "such that, at equal lengths, each group's loss scale on DARO's path is one prompt of that method's "
                     "(shape:grpo and shape:dapo are w = 1); or a JSON file {k: w} (e.g. a DARO run's final weights)")


@dataclass
class AlgoConfig:
    method: str = _f("daro", "loss: grpo, dapo, dr_grpo, lipo, daro, static (DESIGN.md section 1)")
    eps_low: float = _f(0.2, "lower clip range, rho >= 1 - eps_low (paper: 0.2)")
    eps_high: float = _f(0.28, "upper clip range, clip-higher (DAPO, arXiv 2503.14476; paper: 0.28)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 bounding the loss of negative advantages (arXiv 1912.09729)")
    kl_beta: float = _f(0.0, "coefficient of the k3 KL penalty to the initial policy (paper: 0, no KL)")
    std: str = _f("unbiased", "group std for the advantage: 'unbiased' (verl, TRL) or 'population'")
    adv_eps: float = _f(1e-6, "epsilon added to the std in the advantage denominator")
    daro: DaroConfig = field(default_factory=DaroConfig, metadata={"help": "DARO weight options"})


@dataclass
class TrainerConfig:
    steps: int = _f(60, "training steps (paper: 300)")
    prompts_per_step: int = _f(16, "N, prompts per step (paper: batch 128)")
    mini_batch_prompts: int = _f(8, "prompts per optimizer step; later mini-batches are off-policy (paper: 64)")
    micro_batch_prompts: int = _f(0, "prompts per forward/backward pass of a rank (gradient accumulation, the same update "
                                  "to float rounding; TRL's per_device_train_batch_size, verl's ppo_micro_batch_size); "
                                  "0: a rank's whole share of the mini-batch in one pass")
    lr: float = _f(1e-4, "policy learning rate lr_theta (paper: 1e-6 on 1.5B-8B models)")
    weight_decay: float = _f(0.0, "AdamW weight decay of the policy")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    grad_clip: float = _f(1.0, "max global norm of the policy gradient; 0 disables clipping")
    lr_schedule: str = _f("constant", "'constant' or 'cosine' decay to 10% after warm-up")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
    dynamic_sampling: bool = _f(False, "DAPO dynamic sampling: regenerate until N prompts have 0 < mu < 1")
    dynamic_sampling_max_batches: int = _f(3, "most generation batches per step under dynamic sampling")
    eval_every: int = _f(20, "evaluate on the held-out prompts every n steps (0: only at start and end)")
    eval_samples: int = _f(8, "responses sampled per held-out prompt for eval/sampled_acc (avg@n at the rollout temperature)")
    grad_norm_every: int = _f(10, "log per-group gradient norms G_mu every n steps (0: never); costs a backward per group")
    checkpoint_every: int = _f(20, "save a checkpoint every n steps (and always at the end)")
    checkpoint_dir: str = _f("checkpoints", "checkpoints go to <checkpoint_dir>/<run id>/")
    log_checkpoint: bool = _f(True, "also store the final checkpoint as the run's MLflow artifact 'checkpoint/'")
    device: str = _f("cpu", "torch device")
    threads: int = _f(0, "torch intra-op threads; 0 leaves torch's default")
    mixed_precision: bool = _f(True, "with model.dtype bf16/fp16: fp32 master weights and AdamW states, compute under "
                               "autocast in model.dtype, generation from a model.dtype copy (false: parameters and "
                               "AdamW in model.dtype, where steps below ~0.4% of a weight round away); FSDP always mixes")
    parallel: str = _f("ddp", "data parallelism under torchrun: 'ddp' (torch DDP, a full replica per rank) or "
                       "'fsdp' (FSDP2 fully_shard: parameters, gradients and AdamW states sharded over ranks, "
                       "fp32 master weights with compute in model.dtype; verl's actor strategy 'fsdp2'); "
                       "ignored in one process")


@dataclass
class EvalConfig:
    benchmarks: list[str] = _f([], "benchmarks as name=path (JSONL/parquet, problem/answer), e.g. MATH500=data/math500.jsonl; also run at the trainer's evaluations")
    k: int = _f(4, "samples per problem for avg@k and pass@k (4 as in issue 6; pass@k: the unbiased estimator of Chen et al. 2021, arXiv 2107.03374)")
    greedy: bool = _f(False, "one greedy response per problem instead of k samples (avg@1 = pass@1)")
    temperature: float = _f(0.6, "sampling temperature of evaluation (DeepSeek-R1's evaluation setting, arXiv 2501.12948)")
    top_p: float = _f(0.95, "nucleus threshold of evaluation (DeepSeek-R1's evaluation setting, arXiv 2501.12948)")
    max_new_tokens: int = _f(0, "longest evaluation response; 0: rollout.max_new_tokens")
    batch_size: int = _f(64, "prompts generated at once during evaluation (64: our choice, half the paper's 128-prompt batch)")
    reward: str = _f("math", "task whose verifier scores benchmark answers: 'math' (math-verify), 'file' (exact match), 'arithmetic'")
    experiment: str = _f("daro-lab-eval", "MLflow experiment of `daro-lab eval` runs")


@dataclass
class TrackingConfig:
    uri: str = _f("", "MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = _f("daro-lab", "MLflow experiment name")
    run_name: str = _f("", "MLflow run name; empty derives '<method>-seed<seed>'")
    log_every: int = _f(1, "log the step metrics to MLflow every n steps, each as its mean over those n steps (as TRL's "
                           "logging_steps); the per-mu tables keep every step and evaluations are logged when they run")


@dataclass
class Config:
    seed: int = _f(0, "seed of everything random in training (same seed, same numbers on CPU)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "policy model"})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "prompts and verifier"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "response generation"})
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={"help": "loss and DARO weights"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={"help": "RL loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "benchmark evaluation (daro-lab eval)"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'algo.daro.lr_w': 0.001}: the form logged as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = v

        walk("", self.to_dict())
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` (parsed from TOML) against the annotation `tp`; int -> float is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A `--set` value: TOML syntax (1e-5, true, [1, 2], "x"), or a bare word taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to raw config data (a nested dict), in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    from daro_lab.algorithms import METHODS  # local import: config must not need torch to parse

    def bad(key: str, why: str) -> None:
        raise ConfigError(f"config key '{key}': {why}")

    if cfg.algo.method not in METHODS:
        bad("algo.method", f"unknown method {cfg.algo.method!r}; choose one of {', '.join(sorted(METHODS))}")
    if cfg.algo.std not in ("unbiased", "population"):
        bad("algo.std", f"expected 'unbiased' or 'population', got {cfg.algo.std!r}")
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1.0:
        bad("algo.dual_clip", f"must be > 1, got {cfg.algo.dual_clip}")
    d = cfg.algo.daro
    if d.param not in ("log", "direct"):
        bad("algo.daro.param", f"expected 'log' or 'direct', got {d.param!r}")
    from daro_lab.algorithms import SIGNALS

    if d.signal not in SIGNALS:
        bad("algo.daro.signal", f"expected one of {', '.join(map(repr, SIGNALS))}, got {d.signal!r}")
    if isinstance(d.reg, str) and d.reg != "auto":
        bad("algo.daro.reg", f"expected a number > 0 or 'auto', got {d.reg!r}")
    if not isinstance(d.reg, str) and not (math.isfinite(d.reg) and d.reg > 0):
        bad("algo.daro.reg", f"expected a number > 0 or 'auto', got {d.reg!r}")
    shapes = ("grpo", "dapo", "dr_grpo", "lipo")
    if d.static in shapes or d.static in METHODS:
        bad("algo.daro.static", f"{d.static!r} is not a static-weight spec: frozen at a method's static shape is "
            f"'shape:<method>' (one of {', '.join(shapes)}), which weighs each group like one prompt of that method at "
            "equal lengths; or 'ones', or a JSON file {k: w}")
    if d.static.startswith("shape:") and d.static.removeprefix("shape:") not in shapes:
        bad("algo.daro.static", f"{d.static!r}: the shape of one of {', '.join(shapes)}, e.g. 'shape:dr_grpo'")
    if not 0 <= d.signal_ema < 1:
        bad("algo.daro.signal_ema", f"expected a decay in [0, 1), got {d.signal_ema!r}")
    if not 0 < d.w_min <= d.init <= d.w_max:
        bad("algo.daro", f"need 0 < w_min <= init <= w_max, got {d.w_min}, {d.init}, {d.w_max}")
    if cfg.rollout.num_responses < 2:
        bad("rollout.num_responses", f"K must be >= 2 for any interior pass rate, got {cfg.rollout.num_responses}")
    if not 0 < cfg.rollout.vllm_gpu_memory < 1:
        bad("rollout.vllm_gpu_memory", f"must be a fraction in (0, 1), got {cfg.rollout.vllm_gpu_memory}")
    if cfg.rollout.engine not in ("hf", "vllm"):
        bad("rollout.engine", f"expected 'hf' or 'vllm', got {cfg.rollout.engine!r}")
    t = cfg.trainer
    if t.prompts_per_step < 1 or t.mini_batch_prompts < 1:
        bad("trainer.prompts_per_step", "prompts_per_step and mini_batch_prompts must be >= 1")
    if t.prompts_per_step % t.mini_batch_prompts:
        bad("trainer.mini_batch_prompts",
            f"must divide prompts_per_step ({t.prompts_per_step}), got {t.mini_batch_prompts}")
    if t.lr_schedule not in ("constant", "cosine"):
        bad("trainer.lr_schedule", f"expected 'constant' or 'cosine', got {t.lr_schedule!r}")
    if t.micro_batch_prompts < 0:
        bad("trainer.micro_batch_prompts", f"must be >= 0 (0: no accumulation), got {t.micro_batch_prompts}")
    if t.parallel not in ("ddp", "fsdp"):
        bad("trainer.parallel", f"expected 'ddp' or 'fsdp', got {t.parallel!r}")
    if len(t.betas) != 2:
        bad("trainer.betas", f"expected two numbers, got {t.betas}")
    m = cfg.model
    if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad("model.dtype", f"expected 'auto', 'float32', 'bfloat16' or 'float16', got {m.dtype!r}")
    if m.prompt_template not in ("plain", "qwen_math", "chat") and "{prompt}" not in m.prompt_template:
        bad("model.prompt_template", f"expected 'plain', 'qwen_math', 'chat' or a string containing {{prompt}}, got {m.prompt_template!r}")
    if m.logprob_chunk_size < 0:
        bad("model.logprob_chunk_size", f"must be >= 0 (0: unchunked), got {m.logprob_chunk_size}")
    tk = cfg.task
    if tk.name == "chain":
        from daro_lab.tasks.chain import max_answer_length

        longest = max_answer_length(tk)
        if cfg.rollout.max_new_tokens <= longest:
            bad("rollout.max_new_tokens", f"the chain task's longest answer has {longest} characters; the cap must "
                f"exceed it (so that an answer that equals the chain has stopped by itself), got {cfg.rollout.max_new_tokens}")
    if tk.answer_extract not in ("auto", "none", "boxed"):
        bad("task.answer_extract", f"expected 'auto', 'none' or 'boxed', got {tk.answer_extract!r}")
    if tk.num_train < 0 or tk.num_eval < 0:
        bad("task.num_train", f"num_train and num_eval must be >= 0, got {tk.num_train}, {tk.num_eval}")
    if tk.reward_workers < 0:
        bad("task.reward_workers", f"must be >= 0, got {tk.reward_workers}")
    if not tk.reward_timeout_s > 0:
        bad("task.reward_timeout_s", f"must be > 0, got {tk.reward_timeout_s}")
    if cfg.tracking.log_every < 1:
        bad("tracking.log_every", f"must be >= 1, got {cfg.tracking.log_every}")
    e = cfg.eval
    from daro_lab.tasks import task_names  # local import: tasks import this module

    if e.reward not in task_names():
        bad("eval.reward", f"unknown task {e.reward!r}; choose one of {', '.join(task_names())}")
    if e.k < 1:
        bad("eval.k", f"must be >= 1, got {e.k}")
    if e.batch_size < 1 or e.max_new_tokens < 0:
        bad("eval.batch_size", "batch_size must be >= 1 and max_new_tokens >= 0")
    if not e.temperature > 0 or not 0 < e.top_p <= 1:
        bad("eval.temperature", f"need temperature > 0 and 0 < top_p <= 1, got {e.temperature}, {e.top_p}")
    for i, item in enumerate(e.benchmarks):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            bad(f"eval.benchmarks[{i}]", f"expected name=path, got {item!r}")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the source of `daro-lab config --help`-style docs."""
    rows = []
    inst = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_dataclass_type(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(getattr(inst, f.name)), f.metadata.get("help", "")))
    return rows
