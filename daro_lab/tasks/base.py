"""Tasks: prompts with verifiable answers, and the reward that checks a response against them.

A task is two functions: `build(cfg) -> (train, eval)` problem lists, deterministic from
`cfg.data_seed`, and `reward_batch(responses, answers) -> rewards` in {0.0, 1.0}. A response is
the model's completion text after the prompt, already cut at the end-of-sequence token. The tasks are
registered by name in `registry.py`; `TaskConfig` is the config's `[task]` section (the config reads it from here,
so the tasks need nothing above them), and a task's own config rules come with its registration (`Task.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from daro_lab.fields import setting as _f


@dataclass
class TaskConfig:
    name: str = _f(
        "arithmetic",
        "a registered task (daro_lab.tasks.registry): 'arithmetic' or 'chain' (generated), 'math' (data files, "
        "math-verify on the last \\boxed{}) or 'file' (data files, exact match)",
    )
    min_digits: int = _f(1, "arithmetic, chain: fewest digits of an operand", range="[1, inf)")
    max_digits: int = _f(
        3,
        "arithmetic, chain: most digits of an operand; arithmetic: more digits, harder and longer answers",
        range="[1, inf)",
    )
    ops: list[Literal["+", "-", "*"]] = _f(["+"], "arithmetic: operations drawn from ('+', '-', '*')")
    min_terms: int = _f(
        2, "chain: fewest operands (the answer lists the partial sums after the first)", range="[2, inf)"
    )
    max_terms: int = _f(5, "chain: most operands; more operands, harder and longer answers", range="[2, inf)")
    num_train: int = _f(
        4096,
        "number of training prompts (math/file tasks: at most this many rows, drawn by data_seed; 0 = all)",
        range="[0, inf)",
    )
    num_eval: int = _f(
        256, "number of held-out prompts for periodic evaluation (math/file tasks: at most; 0 = all)", range="[0, inf)"
    )
    level_mix: list[float] = _f(
        [],
        "arithmetic, chain: relative frequency of each level in the training prompts, easiest "
        "first, one positive weight per level (chain: min_terms..max_terms; arithmetic: "
        "min_digits..max_digits), e.g. [8, 4, 2, 1] easy-heavy; empty: levels equally common. The "
        "held-out set stays level-uniform, so every level's accuracy is measured alike",
        range="(0, inf)",
    )
    data_seed: int = _f(1234, "seed of the prompt generator (independent of the training seed)", range="[0, inf)")
    train_file: str = _f(
        "", "math/file tasks: local JSONL or parquet of training problems (MATH, DAPO-Math-17k, OpenR1-Math layouts)"
    )
    eval_file: str = _f("", "math/file tasks: held-out problems; empty holds out num_eval rows of train_file")
    prompt_field: str = _f(
        "", "field of the problem text, dotted for nesting ('a.b.0'); empty: first of problem, prompt, question"
    )
    answer_field: str = _f(
        "",
        "field of the answer, dotted (DAPO-Math-17k: reward_model.ground_truth); empty: first of answer, reward_model.ground_truth, solution, ground_truth",
    )
    level_field: str = _f("", "optional difficulty field ('Level 3' -> 3); empty: 'level' when the row has it, else 0")
    answer_extract: Literal["auto", "none", "boxed"] = _f(
        "auto",
        "'boxed': the last \\boxed{} of the answer field (MATH solutions); 'none': as is; 'auto': boxed when it has one",
    )
    reward_workers: int = _f(
        2,
        "math task: processes verifying answers with math-verify, 2 for a 2-core machine; 0: in-process, no hard timeout",
        range="[0, inf)",
    )
    reward_timeout_s: float = _f(
        5.0,
        "math task: seconds per answer before it scores 0 (math-verify's own per-call default is 5 s)",
        range="(0, inf)",
    )
    max_prompt_tokens: int = _f(
        0,
        "longest prompt in tokens, prompt template included; 0: the model's context "
        "(max_position_embeddings) less the longest response (rollout/eval max_new_tokens)",
        range="[0, inf)",
    )
    long_prompts: Literal["error", "drop"] = _f(
        "error",
        "training and held-out prompts longer than that: 'error' stops before any run exists, "
        "naming the rows; 'drop' leaves them out, counted on stderr and in the run's tag "
        "daro_lab.dropped_prompts (a benchmark's long prompts are always an error)",
    )


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer; `level` is the difficulty (arithmetic: operand digits); `source`
    says where a problem read from a file came from ("data file x.jsonl: line 17"), for error messages."""

    prompt: str
    answer: str
    level: int
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Task:
    """A registered task: how to build its problems and how to score responses. Generated tasks also draw
    fresh problems (`sample`, for the tiny preset's supervised warm start) and count their prompts."""

    name: str
    build: Callable[[TaskConfig], tuple[list[Problem], list[Problem]]]
    reward_batch: Callable[[list[str], list[str]], list[float]]
    sample: Callable[..., Problem] | None = None  # sample(rng, cfg) -> a problem drawn like the training set
    num_distinct: Callable[[TaskConfig], int] | None = None
    run_on: Callable[[Problem, TaskConfig], str] | None = None  # a demonstration that does not stop (warm start)
    run_on_weight: Callable[[Problem, TaskConfig], float] | None = None  # its relative frequency for a problem
    levels: Callable[[TaskConfig], list[int]] | None = None  # generated tasks: the levels task.level_mix weighs
    # check(cfg) -> (config key, why) for each rule of the whole config (daro_lab.config.Config) this task breaks;
    # `daro_lab.config.validate` turns the first into a ConfigError naming the key
    check: Callable[[Any], Iterable[tuple[str, str]]] | None = None
