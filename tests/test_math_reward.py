"""The math task's reward: math-verify on the last \\boxed{}, in a reused process pool with a hard timeout per answer."""

from __future__ import annotations

import json
import threading
import time

import pytest

from daro_lab.tasks import TaskConfig, get_task
from daro_lab.tasks import math as math_task
from daro_lab.tasks.math import VerifierPool, score_answer

CASES = [  # (response, reference answer, reward)
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{4}", "3", 0.0),
    ("the answer is 3", "3", 0.0),  # no \boxed{}: no reward
    ("first \\boxed{2}, then corrected: \\boxed{3}", "3", 1.0),  # the LAST box counts
    ("\\boxed{3} ... no wait \\boxed{2}", "3", 0.0),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{\\sqrt 2}{2}", 1.0),
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    ("\\boxed{33}", "033", 1.0),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", 1.0),
    ("\\boxed{}", "1", 0.0),
    ("\\boxed{1", "1", 0.0),  # unbalanced
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
]


def slow_score(response: str, answer: str, inner_timeout: int | None = None) -> float:
    """A verifier that hangs on the answer 'HANG' (stands in for sympy stuck on a pathological expression)."""
    if answer == "HANG":
        time.sleep(120)
    return score_answer(response, answer, inner_timeout)


def crash_score(response: str, answer: str, inner_timeout: int | None = None) -> float:
    """A verifier whose worker dies on the answer 'CRASH' (as on a segfault or the OOM killer)."""
    if answer == "CRASH":
        import os

        os._exit(1)
    return score_answer(response, answer, inner_timeout)


@pytest.mark.parametrize("response, answer, reward", CASES)
def test_score_answer_in_process(response, answer, reward):
    assert score_answer(response, answer, 5) == reward


def test_score_answer_outside_the_main_thread_has_signal_timeouts_off():
    """math-verify's SIGALRM timeouts raise in a thread; ours are switched off there, so scoring still works."""
    out = {}

    def run():
        out["r"] = [score_answer(r, a, 5) for r, a, _ in CASES]

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out["r"] == [w for _, _, w in CASES]
    pool = VerifierPool(workers=0, timeout_s=5)  # in-process mode, from a thread
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("r", pool.score(["\\boxed{2}"], ["2"])))
    t.start()
    t.join(60)
    assert res["r"] == [1.0]


def test_pool_matches_in_process_and_is_reused():
    pool = math_task.get_pool(2, 5.0)
    assert math_task.get_pool(2, 5.0) is pool
    pool.start()
    pids = {p.pid for p in pool._ex._processes.values()}
    assert len(pids) == 2
    rs, ans, want = zip(*CASES)
    assert pool.score(list(rs) * 3, list(ans) * 3) == list(want) * 3
    assert {p.pid for p in pool._ex._processes.values()} == pids  # same workers: no start-up per call
    with pytest.raises(ValueError):
        pool.score(["a"], [])
    assert pool.score([], []) == []


def test_a_hanging_answer_scores_zero_within_the_timeout_and_the_pool_recovers():
    # 3 s per answer: the normal answers take milliseconds, but on a loaded 2-core machine (another test
    # process running) 1 s was seen to time out the first ones too
    pool = VerifierPool(workers=2, timeout_s=3.0, score_fn=slow_score).start()
    try:
        responses = ["\\boxed{1}", "\\boxed{2}", "\\boxed{9}", "\\boxed{3}", "\\boxed{4}", "\\boxed{5}"]
        answers = ["1", "2", "HANG", "3", "5", "5"]
        t0 = time.monotonic()
        out = pool.score(responses, answers)
        elapsed = time.monotonic() - t0
        assert out == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert elapsed < 15, f"a hanging verifier held the step for {elapsed:.1f} s"
        assert pool.timeouts == 1 and pool.restarts == 1
        assert pool.score(["\\boxed{7}"], ["7"]) == [1.0]  # the restarted pool works
    finally:
        pool.close()


def test_a_crashing_worker_scores_zero_and_the_others_are_rescored():
    pool = VerifierPool(workers=2, timeout_s=5.0, score_fn=crash_score).start()
    try:
        out = pool.score(["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["1", "CRASH", "2", "4"])
        assert out == [1.0, 0.0, 1.0, 0.0]
    finally:
        pool.close()


def test_math_task_builds_from_files_and_rewards(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(
        "".join(
            json.dumps({"problem": f"What is {i}/2?", "solution": f"It is $\\boxed{{\\frac{{{i}}}{{2}}}}$"}) + "\n"
            for i in range(1, 11)
        )
    )
    task = get_task("math")
    train, ev = task.build(TaskConfig(name="math", train_file=str(f), num_eval=2, reward_workers=1, reward_timeout_s=5))
    assert len(train) == 8 and len(ev) == 2 and train[0].answer.startswith("\\frac{")
    assert math_task._ACTIVE is math_task.get_pool(1, 5.0)  # built and started with the config's settings
    assert task.reward_batch(["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}", "1/2"], ["\\frac{1}{2}"] * 4) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
