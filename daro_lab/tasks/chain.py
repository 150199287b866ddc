"""Built-in task `chain`: running sums, where harder problems have longer answers and a model that loses
count runs on.

    "12+17+30+25="  ->  "29 59 84"      (each partial sum after the first operand, space-separated)

Level = number of operands m, drawn uniformly from [min_terms, max_terms]; each operand has a digit count
drawn uniformly from [min_digits, max_digits]. The answer has m - 1 numbers, so its length grows with the
level. The verifier is strict: the response must be exactly the chain, then the end of sequence (no
spaces around it, no extra number). A response that does not stop runs until `rollout.max_new_tokens`
and fails: the config check requires that cap to exceed the longest possible answer, so a response that
equals the chain has ended with EOS. On this task wrong answers tend to run longer than right ones (a
missed stop costs the whole cap), which is what makes the loss scale issue visible on it (README).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from daro_lab.tasks.base import Problem, TaskConfig
from daro_lab.tasks.leveled import build_leveled


def _check(cfg: TaskConfig) -> None:
    if cfg.min_digits < 1 or cfg.max_digits < cfg.min_digits:
        raise ValueError(f"task: need 1 <= min_digits <= max_digits, got {cfg.min_digits}, {cfg.max_digits}")
    if cfg.min_terms < 2 or cfg.max_terms < cfg.min_terms:
        raise ValueError(f"task: need 2 <= min_terms <= max_terms, got {cfg.min_terms}, {cfg.max_terms}")


def max_answer_length(cfg: TaskConfig) -> int:
    """Characters of the longest possible answer (every operand at its largest)."""
    top = 10**cfg.max_digits - 1
    return sum(len(str(top * j)) for j in range(2, cfg.max_terms + 1)) + cfg.max_terms - 2


def levels(cfg: TaskConfig) -> list[int]:
    """The levels (operand counts) that task.level_mix weighs, easiest first."""
    return list(range(cfg.min_terms, cfg.max_terms + 1))


def check(cfg: Any) -> Iterator[tuple[str, str]]:
    """(config key, why) for each chain-task rule the whole config (daro_lab.config.Config) breaks: bounds in order,
    and a response cap above the longest answer, so that a response that equals the chain has stopped by itself."""
    tk = cfg.task
    if tk.max_digits < tk.min_digits:
        yield "task.max_digits", f"must be >= task.min_digits ({tk.min_digits}), got {tk.max_digits}"
    if tk.max_terms < tk.min_terms:
        yield "task.max_terms", f"must be >= task.min_terms ({tk.min_terms}), got {tk.max_terms}"
    elif cfg.rollout.max_new_tokens <= (longest := max_answer_length(tk)):
        yield (
            "rollout.max_new_tokens",
            f"the chain task's longest answer has {longest} characters; the cap must exceed it (so that an answer "
            f"that equals the chain has stopped by itself), got {cfg.rollout.max_new_tokens}",
        )


def make_problem(operands: list[int]) -> Problem:
    """The problem "a+b+...=" with its chain of partial sums; level = number of operands."""
    sums, total = [], operands[0]
    for x in operands[1:]:
        total += x
        sums.append(str(total))
    return Problem(prompt="+".join(map(str, operands)) + "=", answer=" ".join(sums), level=len(operands))


def _operand(rng: random.Random, cfg: TaskConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _sample_in_level(cfg: TaskConfig, rng: random.Random, level: int) -> Problem:
    return make_problem([_operand(rng, cfg) for _ in range(level)])


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    """One random problem: level ~ U{min_terms..max_terms}."""
    _check(cfg)
    return _sample_in_level(cfg, rng, rng.randint(cfg.min_terms, cfg.max_terms))


def level_size(cfg: TaskConfig, level: int) -> int:
    """Distinct prompts with `level` operands."""
    lo = 0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
    return (10**cfg.max_digits - lo) ** level


def _enumerate_level(cfg: TaskConfig, level: int) -> list[Problem]:
    import itertools

    lo = 0 if cfg.min_digits == 1 else 10 ** (cfg.min_digits - 1)
    return [make_problem(list(ops)) for ops in itertools.product(range(lo, 10**cfg.max_digits), repeat=level)]


def num_distinct(cfg: TaskConfig) -> int:
    return sum(level_size(cfg, m) for m in range(cfg.min_terms, cfg.max_terms + 1))


def build(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval), deterministic from cfg.data_seed, levels equally common (training: or mixed by
    task.level_mix; see tasks.leveled)."""
    _check(cfg)
    return build_leveled(
        levels(cfg),
        lambda m: level_size(cfg, m),
        lambda rng, m: _sample_in_level(cfg, rng, m),
        lambda m: _enumerate_level(cfg, m),
        cfg.num_train,
        cfg.num_eval,
        cfg.data_seed,
        cfg.level_mix,
    )


def run_on(problem: Problem, cfg: TaskConfig, extra: int | None = None) -> str:
    """The chain of a model that loses count: after the last operand it keeps adding the operands again, from
    the first, for `extra` more sums (default max_terms), and never stops. Warm-start demonstrations of this
    kind (model.warmstart_run_on) give the tiny policy the failure mode of long wrong answers."""
    ops = [int(x) for x in problem.prompt.rstrip("=").split("+")]
    sums, total = problem.answer.split(" "), sum(ops)
    for j in range(cfg.max_terms if extra is None else extra):
        total += ops[j % len(ops)]
        sums.append(str(total))
    return " ".join(sums)


def run_on_weight(problem: Problem, cfg: TaskConfig) -> float:
    """How often a level loses count, relative to the hardest: (m - min_terms + 1) / (max_terms - min_terms + 1)."""
    return (problem.level - cfg.min_terms + 1) / (cfg.max_terms - cfg.min_terms + 1)


def verify(response: str, answer: str) -> float:
    """1.0 when the response is exactly the chain (then EOS, already cut off), else 0.0. No stripping."""
    return 1.0 if response == answer else 0.0


def reward_batch(responses: list[str], answers: list[str]) -> list[float]:
    """verify() over paired lists; (B,) responses and (B,) answers -> (B,) rewards in {0.0, 1.0}."""
    if len(responses) != len(answers):
        raise ValueError(f"reward_batch: {len(responses)} responses but {len(answers)} answers")
    return [verify(r, a) for r, a in zip(responses, answers)]
