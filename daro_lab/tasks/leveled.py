"""Problem sets whose difficulty levels are equally common: the built-in generated tasks use this.

`build_leveled` draws the held-out set first, then the training set, each slot's level uniform over the
task's levels (training: or drawn by `mix`, the levels' relative weights, config key task.level_mix; the held-out
set stays uniform so that every level's accuracy is measured alike). The held-out set has distinct prompts and takes at most a quarter of a level's distinct
prompts (so training keeps most of a small level); training draws distinct prompts of a level while its
remaining pool lasts and repeats them after that (one-digit addition has only 100 prompts: a level-uniform
training set repeats them, as sampling them during training would).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from daro_lab.tasks.base import Problem

EVAL_SHARE = 0.25  # most of a level's distinct prompts the held-out set may take


def build_leveled(
    levels: list[int],
    level_size: Callable[[int], int],
    sample: Callable[[random.Random, int], Problem],
    enumerate_level: Callable[[int], list[Problem]],
    num_train: int,
    num_eval: int,
    seed: int,
    mix: Sequence[float] = (),
) -> tuple[list[Problem], list[Problem]]:
    """(train, eval), deterministic from `seed`.

    level_size(l): distinct prompts of level l; sample(rng, l): a uniform prompt of level l;
    enumerate_level(l): every prompt of level l (called only for levels small next to the request);
    mix: one positive weight per level for the training set (empty: uniform, the same draws as before it existed).
    """
    if mix and (len(mix) != len(levels) or min(mix) <= 0):
        raise ValueError(f"task.level_mix: expected {len(levels)} positive weights (levels {levels}), got {list(mix)}")
    rng = random.Random(seed)
    pools: dict[int, list[Problem] | None] = {}  # level -> all its prompts, shuffled (small levels only)
    cursor: dict[int, int] = {}  # level -> next unread position in its pool

    def pool(level: int) -> list[Problem] | None:
        if level not in pools:
            small = level_size(level) <= 4 * (num_train + num_eval)
            pools[level] = rng.sample(enumerate_level(level), level_size(level)) if small else None
            cursor[level] = 0
        return pools[level]

    taken: set[str] = set()

    def fresh(level: int) -> Problem | None:
        """A prompt of `level` not taken yet (None: a small level's pool is used up)."""
        pl = pool(level)
        if pl is None:
            while True:
                p = sample(rng, level)
                if p.prompt not in taken:
                    break
        else:
            while cursor[level] < len(pl) and pl[cursor[level]].prompt in taken:
                cursor[level] += 1
            if cursor[level] == len(pl):
                return None
            p = pl[cursor[level]]
        taken.add(p.prompt)
        return p

    cap = {lvl: int(EVAL_SHARE * level_size(lvl)) for lvl in levels}
    if num_eval > sum(cap.values()):
        raise ValueError(
            f"task: {num_eval} held-out prompts requested, but the held-out set may take at most "
            f"{sum(cap.values())} (a quarter of each level's distinct prompts); lower task.num_eval"
        )
    ev: list[Problem] = []
    while len(ev) < num_eval:
        level = rng.choice([lvl for lvl in levels if cap[lvl] > 0])
        cap[level] -= 1
        ev.append(fresh(level))  # type: ignore[arg-type] - the cap leaves three quarters of the pool
    held = set(taken)
    repeat: dict[int, list[Problem]] = {}  # level -> its training prompts, once its pool is used up
    train: list[Problem] = []
    for _ in range(num_train):
        level = rng.choices(levels, weights=mix)[0] if mix else rng.choice(levels)
        p = fresh(level)
        if p is None:  # a small level's pool is used up: repeat one of its training prompts
            if level not in repeat:
                repeat[level] = [q for q in pools[level] if q.prompt not in held]  # type: ignore[union-attr]
            p = rng.choice(repeat[level])
        train.append(p)
    return train, ev
