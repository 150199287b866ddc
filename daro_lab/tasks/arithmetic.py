"""Built-in arithmetic task: prompts like "12+345=", answers like "357".

Difficulty level = digits of the longer operand; a level is drawn uniformly from
[min_digits, max_digits], so every level is equally common and harder problems have longer answers.
The verifier is strict: the response must be exactly the canonical integer ("-" then digits,
no leading '+', no extra text), else the reward is 0.
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterator

from daro_lab.tasks.base import Problem, TaskConfig
from daro_lab.tasks.leveled import build_leveled

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ANSWER = re.compile(r"-?[0-9]+")  # ASCII digits only: no '+', no unicode digits, no spaces inside


def _check(cfg: TaskConfig) -> None:
    if cfg.min_digits < 1 or cfg.max_digits < cfg.min_digits:
        raise ValueError(f"task: need 1 <= min_digits <= max_digits, got {cfg.min_digits}, {cfg.max_digits}")
    bad = [op for op in cfg.ops if op not in OPS]
    if not cfg.ops or bad:
        raise ValueError(f"task.ops: expected a non-empty list drawn from {list(OPS)}, got {cfg.ops!r}")


def levels(cfg: TaskConfig) -> list[int]:
    """The levels (digits of the longer operand) that task.level_mix weighs, easiest first."""
    return list(range(cfg.min_digits, cfg.max_digits + 1))


def check(cfg: Any) -> Iterator[tuple[str, str]]:
    """(config key, why) for each arithmetic-task rule the whole config (daro_lab.config.Config) breaks."""
    tk = cfg.task
    if tk.max_digits < tk.min_digits:
        yield "task.max_digits", f"must be >= task.min_digits ({tk.min_digits}), got {tk.max_digits}"
    if not tk.ops:
        yield "task.ops", f"expected a non-empty list drawn from {', '.join(map(repr, OPS))}, got []"


def _number(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits (1 digit includes 0)."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def make_problem(a: int, op: str, b: int) -> Problem:
    """The problem "a<op>b=" with its exact answer; level = digits of the longer operand."""
    return Problem(prompt=f"{a}{op}{b}=", answer=str(OPS[op](a, b)), level=max(len(str(a)), len(str(b))))


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    """One random problem: level ~ U{min..max}, one operand has `level` digits, the other <= level."""
    _check(cfg)
    return _sample_in_level(cfg, rng, rng.randint(cfg.min_digits, cfg.max_digits))


def num_distinct(cfg: TaskConfig) -> int:
    """How many distinct prompts the config can produce."""
    return sum(level_size(cfg, level) for level in range(cfg.min_digits, cfg.max_digits + 1))


def _count(digits: int) -> int:
    """Integers with exactly `digits` digits (1 digit includes 0)."""
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


def level_size(cfg: TaskConfig, level: int) -> int:
    """Distinct prompts of a level: ops x ordered pairs whose longer operand has `level` digits (the
    other at least min_digits)."""
    smaller = sum(_count(d) for d in range(cfg.min_digits, level))
    n = _count(level)
    return len(set(cfg.ops)) * (n * n + 2 * n * smaller)


def _enumerate_level(cfg: TaskConfig, level: int) -> list[Problem]:
    lo = 0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
    nums = range(lo, 10**level)
    return [
        make_problem(a, op, b)
        for op in dict.fromkeys(cfg.ops)
        for a in nums
        for b in nums
        if max(len(str(a)), len(str(b))) == level
    ]


def _sample_in_level(cfg: TaskConfig, rng: random.Random, level: int) -> Problem:
    op = rng.choice(cfg.ops)
    a, b = _number(rng, level), _number(rng, rng.randint(cfg.min_digits, level))
    if rng.random() < 0.5:
        a, b = b, a
    return make_problem(a, op, b)


def build(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problem lists, deterministic from cfg.data_seed; every level (digits of the longer
    operand) equally common in both (`tasks.leveled`; training: or mixed by task.level_mix): the held-out set has distinct prompts, disjoint from
    training; a level with fewer distinct prompts than its share of training (one digit: 100) repeats them."""
    _check(cfg)
    return build_leveled(
        levels(cfg),
        lambda lvl: level_size(cfg, lvl),
        lambda rng, lvl: _sample_in_level(cfg, rng, lvl),
        lambda lvl: _enumerate_level(cfg, lvl),
        cfg.num_train,
        cfg.num_eval,
        cfg.data_seed,
        cfg.level_mix,
    )


def parse_answer(text: str) -> str | None:
    """The integer a response states, or None when it is not exactly one canonical-looking integer.

    `text` is the completion after the prompt with the EOS token already cut off. Surrounding
    whitespace is stripped; what remains must be an optional '-' then ASCII digits, nothing else.
    """
    s = text.strip()
    return s if _ANSWER.fullmatch(s) else None


def verify(response: str, answer: str) -> float:
    """1.0 if the parsed response equals the reference answer string exactly, else 0.0.

    Exact string match: "007" or "-0" do not match "7" or "0"; answers are canonical `str(int)`.
    """
    parsed = parse_answer(response)
    return 1.0 if parsed is not None and parsed == answer else 0.0


def reward_batch(responses: list[str], answers: list[str]) -> list[float]:
    """verify() over paired lists; (B,) responses and (B,) answers -> (B,) rewards in {0.0, 1.0}."""
    if len(responses) != len(answers):
        raise ValueError(f"reward_batch: {len(responses)} responses but {len(answers)} answers")
    return [verify(r, a) for r, a in zip(responses, answers)]
