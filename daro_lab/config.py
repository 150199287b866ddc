"""Typed experiment configuration: dataclasses loaded from TOML, overridden by `--set a.b=v`.

Every field has one line of help; where a default comes from the DARO paper (arXiv 2510.09001), the
project's math page (docs/math.md) or another paper, the help says so. A field's annotation is its check:
a closed set of choices is a `Literal`, a number declares its interval (`setting(..., range="[0, inf)")`).
`load_config` rejects unknown keys, wrong types and values outside the choices or the interval with an error
naming the key, so a typo never silently runs the default. Choices that users extend (algo.method,
algo.daro.signal, task.name, eval.reward) are checked against their registries in `daro_lab.algorithms` and
`daro_lab.tasks`; a task's own rules (its levels, its longest answer) come from its registration.

The same reader (`read_toml`) and typed builder (`build`, `check_ranges`, with a noun for their messages) load
the ablation grid files (`daro_lab.ablation.grid.GridSpec`): one TOML path, one set of error messages. Field
declarations (`setting`, `Range`) live in `daro_lab.fields`, below the task section (`daro_lab.tasks.base`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from daro_lab.fields import ConfigError, setting
from daro_lab.tasks import TASKS, TaskConfig

_f = setting  # the field tables below read best with a short name


@dataclass
class ModelConfig:
    path: str = _f("", "local Hugging Face model directory; empty builds the tiny preset from this section")
    arch: Literal["llama", "qwen2"] = _f("llama", "tiny preset: architecture, 'llama' or 'qwen2'")
    init_seed: int = _f(
        0, "tiny preset: seed of its initialisation and warm start (shared by every training seed)", range="[0, inf)"
    )
    hidden_size: int = _f(64, "tiny preset: hidden size of the Llama-architecture model", range="[1, inf)")
    num_layers: int = _f(2, "tiny preset: number of decoder layers", range="[1, inf)")
    num_heads: int = _f(4, "tiny preset: attention heads", range="[1, inf)")
    num_kv_heads: int = _f(2, "tiny preset: key/value heads (grouped-query attention)", range="[1, inf)")
    intermediate_size: int = _f(256, "tiny preset: MLP width", range="[1, inf)")
    tie_embeddings: bool = _f(False, "tiny preset: tie input and output embeddings")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f(
        "float32", "parameter dtype: float32, bfloat16, float16, or 'auto' (bfloat16 on GPU, float32 on CPU)"
    )
    warmstart_steps: int = _f(
        1200, "tiny preset: supervised warm-start steps, so pass rates spread over (0, 1)", range="[0, inf)"
    )
    warmstart_lr: float = _f(1e-3, "tiny preset: warm-start learning rate", range="(0, inf)")
    warmstart_batch: int = _f(64, "tiny preset: warm-start batch size", range="[1, inf)")
    warmstart_run_on: float = _f(
        0.0,
        "tiny preset, chain task: share of warm-start demonstrations (scaled by level, this at the "
        "hardest) that lose count and run on without stopping, the failure mode of long wrong "
        "answers; 0: every demonstration stops",
        range="[0, 1]",
    )
    cache_dir: str = _f(".daro_cache", "where warm-started tiny models are cached, keyed by a hash of their config")
    prompt_template: str = _f(
        "plain",
        "'plain' ({prompt}), 'qwen_math' (Qwen2.5-Math's boxed CoT prompt, QwenLM/Qwen2.5-Math evaluation), 'chat' (the tokenizer's chat template), or a string with {prompt}",
    )
    stop_token: str = _f(
        "",
        "token that ends a response; empty: '<|im_end|>' or '<|eot_id|>' when the prompt uses it, else the tokenizer's eos",
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute decoder-layer activations in backward: less memory, ~1/3 more compute (off: the tiny preset needs none)",
    )
    logprob_chunk_size: int = _f(
        0,
        "tokens per lm_head + fp32 log-softmax chunk in the trainer's log-probs; 0 unchunked (fine at the tiny preset's few tokens; 150k-token vocabularies need it)",
        range="[0, inf)",
    )
    arch_file: str = _f(
        "",
        "HF config.json of the architecture, for `train --dry-run` when model.path has none (experiments/paper/arch/)",
    )


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = _f("hf", "rollout engine: 'hf' (transformers) or 'vllm'")
    num_responses: int = _f(8, "K, responses sampled per prompt (paper: 8)", range="[2, inf)")
    max_new_tokens: int = _f(8, "longest response; also Dr. GRPO's constant normaliser L_max", range="[1, inf)")
    temperature: float = _f(
        1.0, "sampling temperature (paper setup: 1.0); below 0.01 the logits / T overflow float32", range="[0.01, 100]"
    )
    top_p: float = _f(1.0, "nucleus sampling threshold; 1.0 disables it", range="(0, 1]")
    vllm_gpu_memory: float = _f(
        0.3,
        "engine 'vllm': fraction of the GPU's memory vLLM holds for its weights and KV cache "
        "beside the trainer (vLLM's gpu_memory_utilization; colocated as in verl)",
        range="(0, 1)",
    )


@dataclass
class DaroConfig:
    lr_w: float = _f(
        1e-3, "learning rate of the DARO weights (paper: 1e-3), own AdamW group, no weight decay", range="[0, inf)"
    )
    param: Literal["log", "direct"] = _f(
        "log", "weight parametrisation: 'log' (w = exp(s)) or 'direct' (w clamped to bounds) (docs/math.md)"
    )
    signal: str = _f(
        "abs",
        "what drives w (w-gradient signal - C/w, fixed point w = C/signal): 'abs' |L_mu| (docs/math.md), "
        "'signed' L_mu (paper-literal), 'grad' ||grad L_mu||, 'mass' token-mean of |A| g (the group's loss "
        "mass before advantages of opposite sign cancel)",
    )
    reg: float | Literal["auto"] = _f(
        1.0,
        "C of the regulariser sum_mu (w L_mu - C ln w_mu): a number (1.0 = the paper's), or 'auto': the "
        "running mean (bias-corrected EMA, decay 0.99) of the present groups' mean signal, so that the "
        "weights' geometric centre stays near 1",
        range="(0, inf)",
    )
    signal_ema: float = _f(
        0.0,
        "decay of a per-group, bias-corrected EMA of the signal across updates (0: each mini-batch's "
        "own signal, the paper's reading)",
        range="[0, 1)",
    )
    w_min: float = _f(1e-3, "lower bound of every weight (docs/math.md)", range="(0, inf)")
    w_max: float = _f(1e3, "upper bound of every weight (docs/math.md)", range="(0, inf)")
    init: float = _f(1.0, "initial value of every weight", range="(0, inf)")
    static: str = _f(
        "ones",
        "frozen weights of the 'static' method: 'ones'; 'shape:<method>' (grpo, dapo, dr_grpo, lipo): w "
        "such that, at equal lengths, each group's loss scale on DARO's path is one prompt of that method's "
        "(shape:grpo and shape:dapo are w = 1); 'shape:mass': the closed-form fixed point of DARO with the "
        "'mass' reading and C = auto, w = c / sqrt(mu(1-mu)) with harmonic mean 1 (docs/math.md, section "
        "4); or a JSON file {k: w} (e.g. a DARO run's final weights)",
    )


@dataclass
class AlgoConfig:
    method: str = _f("daro", "loss: grpo, dapo, dr_grpo, lipo, daro, static (docs/math.md)")
    eps_low: float = _f(0.2, "lower clip range, rho >= 1 - eps_low (paper: 0.2)", range="[0, 1]")
    eps_high: float = _f(0.28, "upper clip range, clip-higher (DAPO, arXiv 2503.14476; paper: 0.28)", range="[0, inf)")
    dual_clip: float | None = _f(
        None, "dual-clip constant c > 1 bounding the loss of negative advantages (arXiv 1912.09729)", range="(1, inf)"
    )
    kl_beta: float = _f(
        0.0,
        "coefficient of the k3 KL penalty to the initial policy (paper: 0, no KL; GRPO's "
        "DeepSeekMath setting 0.04); above 100 the penalty swamps every reward",
        range="[0, 100]",
    )
    kl_ratio: bool = _f(
        False,
        "with kl_beta > 0: the per-token k3 KL times the importance ratio pi/pi_old (differentiable), the unbiased "
        "reverse-KL gradient (DeepSeek-V3.2, arXiv 2512.02556; TRL 1.16's use_bias_correction_kl, on by default there)",
    )
    std: Literal["unbiased", "population"] = _f(
        "unbiased", "group std for the advantage: 'unbiased' (verl, TRL) or 'population'"
    )
    adv_eps: float = _f(1e-6, "epsilon added to the std in the advantage denominator", range="[0, inf)")
    daro: DaroConfig = field(default_factory=DaroConfig, metadata={"help": "DARO weight options"})


@dataclass
class TrainerConfig:
    steps: int = _f(60, "training steps (paper: 300)", range="[1, inf)")
    prompts_per_step: int = _f(16, "N, prompts per step (paper: batch 128)", range="[1, inf)")
    mini_batch_prompts: int = _f(
        8, "prompts per optimizer step; later mini-batches are off-policy (paper: 64)", range="[1, inf)"
    )
    micro_batch_prompts: int = _f(
        0,
        "prompts per forward/backward pass of a rank (gradient accumulation, the same update "
        "to float rounding; TRL's per_device_train_batch_size, verl's ppo_micro_batch_size); "
        "0: a rank's whole share of the mini-batch in one pass",
        range="[0, inf)",
    )
    lr: float = _f(1e-4, "policy learning rate lr_theta (paper: 1e-6 on 1.5B-8B models)", range="[0, inf)")
    weight_decay: float = _f(0.0, "AdamW weight decay of the policy", range="[0, inf)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas", range="[0, 1)")
    grad_clip: float = _f(1.0, "max global norm of the policy gradient; 0 disables clipping", range="[0, inf)")
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "'constant' or 'cosine' decay to 10% after warm-up")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps", range="[0, inf)")
    dynamic_sampling: bool = _f(False, "DAPO dynamic sampling: regenerate until N prompts have 0 < mu < 1")
    dynamic_sampling_max_batches: int = _f(
        3, "most generation batches per step under dynamic sampling", range="[1, inf)"
    )
    eval_every: int = _f(
        20, "evaluate on the held-out prompts every n steps (0: only at start and end)", range="[0, inf)"
    )
    eval_samples: int = _f(
        8,
        "responses sampled per held-out prompt for eval/sampled_acc (avg@n at the rollout temperature)",
        range="[1, inf)",
    )
    grad_norm_every: int = _f(
        10, "log per-group gradient norms G_mu every n steps (0: never); costs a backward per group", range="[0, inf)"
    )
    grad_cosines: bool = _f(
        True,
        "on the grad_norm_every steps also the cosines between the groups' gradients of C_mu "
        "(gradcos/mu_k, grad/cos_mean): holds the K-1 groups' gradients at once, K-1 fp32 "
        "copies of the parameters (false for models whose gradient that many times does not fit)",
    )
    checkpoint_every: int = _f(20, "save a checkpoint every n steps (and always at the end)", range="[0, inf)")
    checkpoint_dir: str = _f("checkpoints", "checkpoints go to <checkpoint_dir>/<run id>/")
    log_checkpoint: bool = _f(True, "also store the final checkpoint as the run's MLflow artifact 'checkpoint/'")
    device: str = _f("cpu", "torch device")
    threads: int = _f(
        0,
        "torch intra-op threads; 0: on CPU, the cores other processes leave free when the run "
        "starts (at most torch's default; a busy core stalls every parallel op: trainer/threads.py), "
        "resolved once and logged as this key, so a resume and a rerun of the logged config use the "
        "same count; N: exactly N (under torchrun 0 leaves torchrun's OMP_NUM_THREADS)",
        range="[0, inf)",
    )
    mixed_precision: bool = _f(
        True,
        "with model.dtype bf16/fp16: fp32 master weights and AdamW states, compute under "
        "autocast in model.dtype, generation from a model.dtype copy (false: parameters and "
        "AdamW in model.dtype, where steps below ~0.4% of a weight round away); FSDP always mixes",
    )
    parallel: Literal["ddp", "fsdp"] = _f(
        "ddp",
        "data parallelism under torchrun: 'ddp' (torch DDP, a full replica per rank) or "
        "'fsdp' (FSDP2 fully_shard: parameters, gradients and AdamW states sharded over ranks, "
        "fp32 master weights with compute in model.dtype; verl's actor strategy 'fsdp2'); "
        "ignored in one process",
    )


@dataclass
class EvalConfig:
    benchmarks: list[str] = _f(
        [],
        "benchmarks as name=path (JSONL/parquet, problem/answer), e.g. MATH500=data/math500.jsonl; also run at the trainer's evaluations",
    )
    k: int = _f(
        4,
        "samples per problem for avg@k and pass@k (pass@k: the unbiased estimator of Chen et al. 2021, arXiv 2107.03374)",
        range="[1, inf)",
    )
    greedy: bool = _f(False, "one greedy response per problem instead of k samples (avg@1 = pass@1)")
    temperature: float = _f(
        0.6,
        "sampling temperature of evaluation (DeepSeek-R1's evaluation setting, arXiv 2501.12948); "
        "eval.greedy for argmax decoding",
        range="[0.01, 100]",
    )
    top_p: float = _f(
        0.95, "nucleus threshold of evaluation (DeepSeek-R1's evaluation setting, arXiv 2501.12948)", range="(0, 1]"
    )
    max_new_tokens: int = _f(0, "longest evaluation response; 0: rollout.max_new_tokens", range="[0, inf)")
    batch_size: int = _f(
        64,
        "prompts generated at once during evaluation (64: our choice, half the paper's 128-prompt batch)",
        range="[1, inf)",
    )
    reward: str = _f(
        "math",
        "registered task whose verifier scores benchmark answers: 'math' (math-verify), 'file' (exact match), "
        "'arithmetic', 'chain'",
    )
    experiment: str = _f("daro-lab-eval", "MLflow experiment of `daro-lab eval` runs")


@dataclass
class TrackingConfig:
    uri: str = _f("", "MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = _f("daro-lab", "MLflow experiment name")
    run_name: str = _f("", "MLflow run name; empty derives '<method>-seed<seed>'")
    log_every: int = _f(
        1,
        "log the step metrics to MLflow every n steps, each as its mean over those n steps (as TRL's "
        "logging_steps); the per-mu tables keep every step and evaluations are logged when they run",
        range="[1, inf)",
    )


@dataclass
class Config:
    seed: int = _f(0, "seed of everything random in training (same seed, same numbers on CPU)", range="[0, inf)")
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
# Loading: one TOML reader and one typed builder, for configs and for ablation grid files


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The data of a TOML file; ConfigError naming `what` and the file when it is missing, not UTF-8 or not TOML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} {p} is not UTF-8 text ({e.reason} at byte {e.start}); TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {p} is not valid TOML: {e}") from e


def _expected(tp: Any) -> str:
    """The values of annotation `tp` in words: 'an integer', "'hf' or 'vllm'", "a number or 'auto'"."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = [repr(c) for c in typing.get_args(tp)]
        return " or ".join(choices) if len(choices) <= 2 else f"one of {', '.join(choices)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "a list"
    if _is_dataclass_type(tp):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(key: str, value: Any, tp: Any, noun: str = "config key") -> Any:
    """`value` (parsed from TOML) checked against the annotation `tp`: int -> float is allowed, a Literal's value
    must be one of its choices, a list's items and a union's alternatives are checked in turn, a table is built
    (`build`). ConfigError "<noun> '<key>': expected ..., got ..." otherwise."""

    def wrong() -> ConfigError:
        return ConfigError(f"{noun} '{key}': expected {_expected(tp)}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        lists = [a for a in alternatives if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:  # a list: its items' errors are the useful ones
            return _coerce(key, value, lists[0], noun)
        for a in alternatives:
            try:
                return _coerce(key, value, a, noun)
            except ConfigError:
                continue
        raise wrong()
    if origin is Literal:
        if not any(value == c and type(value) is type(c) for c in args):
            raise wrong()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (item_tp,) = args
        if _is_dataclass_type(item_tp):  # an array of tables ([[arms]]): each item named in its errors
            return [_build_item(key, i, v, item_tp, noun) for i, v in enumerate(value)]
        return [_coerce(f"{key}[{i}]", v, item_tp, noun) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{noun} '{key}' is a section; got {value!r}")
        return build(tp, value, noun, f"{key}.")
    ok = {
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if tp not in ok:
        raise ConfigError(f"{noun} '{key}': unsupported type {tp}")
    if not ok[tp](value):
        raise wrong()
    return float(value) if tp is float else value


def _build_item(key: str, i: int, value: Any, cls: type, noun: str) -> Any:
    """Item i of an array of tables: its errors start with where it is, "arms[1] ('learned'): ..."."""
    where = f"{key}[{i}]"
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        where += f" ('{value['name']}')"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table ([[{key}]]), got {value!r}")
    try:
        return build(cls, value, noun)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def build(cls: type, data: dict[str, Any], noun: str = "config key", prefix: str = "") -> Any:
    """A `cls` dataclass from TOML data, every value checked against its field's annotation (`_coerce`); unknown
    keys and missing required ones (`setting(REQUIRED, ...)`) are errors naming the key. Ranges are checked
    after (`check_ranges`), with the checks between fields."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {noun} '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(names))})")
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing {noun} '{prefix}{f.name}'")
    return cls(**{name: _coerce(f"{prefix}{name}", value, hints[name], noun) for name, value in data.items()})


def check_ranges(obj: Any, noun: str = "config key", prefix: str = "") -> None:
    """Every numeric field of `obj` (a dataclass, recursively) against its declared `Range`; every float must be
    finite. A numeric config field without a declared range is a bug of this module (tests/test_config.py)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if _is_dataclass_type(hints[f.name]):
            check_ranges(value, noun, f"{key}.")
            continue
        rng = f.metadata.get("range")
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            k = key if i is None else f"{key}[{i}]"
            if dataclasses.is_dataclass(v):
                check_ranges(v, noun, f"{k}.")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # strings, booleans, None: their types and choices are checked by `build`
            what = "an integer" if isinstance(v, int) else "a finite number"
            if (isinstance(v, float) and not math.isfinite(v)) or (rng is not None and v not in rng):
                raise ConfigError(f"{noun} '{k}': must be {what}{f' {rng}' if rng else ''}, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Configs: files, overrides, validation


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
    cfg = build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or the defaults when `path` is None), apply overrides, validate."""
    data = read_toml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def validate(cfg: Config) -> None:
    """Every value in its declared range (`check_ranges`; types and Literal choices were checked by `build`), then
    the choices users extend (registries) and the constraints between fields."""
    from daro_lab.algorithms import METHODS, SIGNALS, shaped_methods  # local: config must not need torch to parse

    def bad(key: str, why: str) -> None:
        raise ConfigError(f"config key '{key}': {why}")

    check_ranges(cfg)
    if cfg.algo.method not in METHODS:
        bad("algo.method", f"unknown method {cfg.algo.method!r}; choose one of {', '.join(sorted(METHODS))}")
    d = cfg.algo.daro
    if d.signal not in SIGNALS:
        bad("algo.daro.signal", f"expected one of {', '.join(map(repr, SIGNALS))}, got {d.signal!r}")
    shapes = tuple(shaped_methods())
    if d.static in shapes or d.static in METHODS:
        bad(
            "algo.daro.static",
            f"{d.static!r} is not a static-weight spec: frozen at a method's static shape is "
            f"'shape:<method>' (one of {', '.join(shapes)}), which weighs each group like one prompt of that method at "
            "equal lengths; or 'ones', or a JSON file {k: w}",
        )
    if d.static.startswith("shape:") and d.static.removeprefix("shape:") not in (*shapes, "mass"):
        bad(
            "algo.daro.static",
            f"{d.static!r}: the shape of one of {', '.join(shapes)}, e.g. 'shape:dr_grpo', or "
            "'shape:mass' (the fixed point of DARO's 'mass' reading with C = auto)",
        )
    if not 0 < d.w_min <= d.init <= d.w_max:
        bad("algo.daro", f"need 0 < w_min <= init <= w_max, got {d.w_min}, {d.init}, {d.w_max}")
    t = cfg.trainer
    if t.prompts_per_step % t.mini_batch_prompts:
        bad(
            "trainer.mini_batch_prompts",
            f"must divide prompts_per_step ({t.prompts_per_step}), got {t.mini_batch_prompts}",
        )
    if len(t.betas) != 2:
        bad("trainer.betas", f"expected two numbers, got {t.betas}")
    m = cfg.model
    if m.prompt_template not in ("plain", "qwen_math", "chat") and "{prompt}" not in m.prompt_template:
        bad(
            "model.prompt_template",
            f"expected 'plain', 'qwen_math', 'chat' or a string containing {{prompt}}, got {m.prompt_template!r}",
        )
    if not m.path:  # the tiny preset is built from these
        if m.hidden_size % m.num_heads:
            bad("model.num_heads", f"must divide model.hidden_size ({m.hidden_size}), got {m.num_heads}")
        if m.num_heads % m.num_kv_heads:
            bad("model.num_kv_heads", f"must divide model.num_heads ({m.num_heads}), got {m.num_kv_heads}")
    try:
        import torch  # local import, as above

        torch.device(t.device)
    except (RuntimeError, ValueError):
        bad("trainer.device", f"not a torch device: {t.device!r} (e.g. 'cpu', 'cuda', 'cuda:1')")
    for key, name in (("task.name", cfg.task.name), ("eval.reward", cfg.eval.reward)):
        if name not in TASKS:
            bad(key, f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    task = TASKS[cfg.task.name]
    if cfg.task.level_mix and task.levels is None:
        bad(
            "task.level_mix",
            f"only the generated tasks ({', '.join(n for n, t in sorted(TASKS.items()) if t.levels)}) "
            f"have levels to mix; task.name is {cfg.task.name!r}",
        )
    if cfg.task.level_mix and len(cfg.task.level_mix) != len(levels := task.levels(cfg.task)):
        bad(
            "task.level_mix",
            f"expected one weight per level {levels[0]}..{levels[-1]} ({len(levels)}), got "
            f"{len(cfg.task.level_mix)}: {list(cfg.task.level_mix)}",
        )
    for key, why in task.check(cfg) if task.check else ():
        bad(key, why)
    for key, name in (("tracking.experiment", cfg.tracking.experiment), ("eval.experiment", cfg.eval.experiment)):
        if not name.strip():
            bad(key, "an MLflow experiment needs a name, got an empty string")
    for i, item in enumerate(cfg.eval.benchmarks):
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
