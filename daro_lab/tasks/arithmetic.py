"""Built-in arithmetic task: prompts like "12+345=", answers like "357".

Difficulty level = digits of the longer operand; a level is drawn uniformly from
[min_digits, max_digits], so every level is equally common and harder problems have longer answers.
The verifier is strict: the response must be exactly the canonical integer ("-" then digits,
no leading '+', no extra text), else the reward is 0.
"""

from __future__ import annotations

import random
import re

from daro_lab.config import TaskConfig
from daro_lab.tasks.base import Problem

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ANSWER = re.compile(r"-?[0-9]+")  # ASCII digits only: no '+', no unicode digits, no spaces inside


def _check(cfg: TaskConfig) -> None:
    if cfg.min_digits < 1 or cfg.max_digits < cfg.min_digits:
        raise ValueError(f"task: need 1 <= min_digits <= max_digits, got {cfg.min_digits}, {cfg.max_digits}")
    bad = [op for op in cfg.ops if op not in OPS]
    if not cfg.ops or bad:
        raise ValueError(f"task.ops: expected a non-empty list drawn from {list(OPS)}, got {cfg.ops!r}")


def _number(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits (1 digit includes 0)."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def make_problem(a: int, op: str, b: int) -> Problem:
    """The problem "a<op>b=" with its exact answer; level = digits of the longer operand."""
    return Problem(prompt=f"{a}{op}{b}=", answer=str(OPS[op](a, b)), level=max(len(str(a)), len(str(b))))


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    """One random problem: level ~ U{min..max}, one operand has `level` digits, the other <= level."""
    level = rng.randint(cfg.min_digits, cfg.max_digits)
    op = rng.choice(cfg.ops)
    a, b = _number(rng, level), _number(rng, rng.randint(cfg.min_digits, level))
    if rng.random() < 0.5:
        a, b = b, a
    return make_problem(a, op, b)


def num_distinct(cfg: TaskConfig) -> int:
    """How many distinct prompts the config can produce."""
    n = 10**cfg.max_digits - (0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1))
    return len(set(cfg.ops)) * n * n


def build(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problem lists with disjoint prompts, deterministic from cfg.data_seed.

    All num_train + num_eval distinct problems are drawn by one process and then split at random,
    so the held-out set follows the training distribution: a level with few distinct prompts
    (one-digit operands give only 100) is not used up by the eval set. When the request is a
    large share of all possible prompts, they are enumerated and shuffled instead of sampled.
    """
    _check(cfg)
    need, total = cfg.num_train + cfg.num_eval, num_distinct(cfg)
    if need > total:
        raise ValueError(
            f"task: {cfg.num_train} train + {cfg.num_eval} eval prompts requested, but digits "
            f"{cfg.min_digits}-{cfg.max_digits} with ops {cfg.ops} give only {total} distinct prompts"
        )
    rng = random.Random(cfg.data_seed)
    if 4 * need >= total:  # small space: enumerate all prompts, shuffle, split
        lo = 0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
        nums = range(lo, 10**cfg.max_digits)
        every = [make_problem(a, op, b) for op in dict.fromkeys(cfg.ops) for a in nums for b in nums]
        rng.shuffle(every)
        return every[cfg.num_eval : need], every[: cfg.num_eval]
    seen: set[str] = set()
    drawn: list[Problem] = []
    while len(drawn) < need:
        p = sample_problem(rng, cfg)
        if p.prompt not in seen:
            seen.add(p.prompt)
            drawn.append(p)
    rng.shuffle(drawn)
    return drawn[cfg.num_eval :], drawn[: cfg.num_eval]


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
