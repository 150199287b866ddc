"""The 'math' task: problems from data files (see files.py), reward by math-verify on the last \\boxed{}.

Reward of a response: 1.0 when the content of its last \\boxed{...} is mathematically equal to the
reference answer according to math-verify (`parse` + `verify`), else 0.0 (no \\boxed{}, unparsable,
different, or too slow).

Verification runs in a pool of worker processes (`VerifierPool`, concurrent.futures over a 'spawn'
context) with a hard timeout per answer: sympy can take minutes, or forever, on a pathological
expression, and a training step must not hang on it. An answer over its time scores 0; the pool's
workers are then killed and restarted (a running future cannot be cancelled), and the answers that
were in flight on the other workers are re-submitted. The pool is created and warmed once (when the
task is built) and reused by every step.

Inside a worker, math-verify's own signal-based timeouts (`parsing_timeout`, `timeout_seconds`) are
used as a first, cheaper guard: a worker runs the call in its main thread, where SIGALRM works.
Wherever the scoring runs outside a main thread (workers=0 called from a thread) they are off
(None), as math-verify requires.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import functools
import logging
import multiprocessing
import threading
import time
from typing import Callable

from daro_lab.tasks import files
from daro_lab.tasks.base import Problem, TaskConfig
from daro_lab.tasks.files import last_boxed

log = logging.getLogger(__name__)

WARM_TIMEOUT_S = 300.0  # starting a worker imports sympy: seconds, not minutes; generous for loaded machines
MAX_ATTEMPTS = 2  # an answer whose worker crashed (not timed out) is retried once, then scores 0


# ---------------------------------------------------------------------------------------------
# Scoring one answer (runs in a worker process)


def _quiet_math_verify() -> None:
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _signal_timeout(seconds: int | None) -> int | None:
    """math-verify's own timeout: only in a main thread (it uses SIGALRM), else None (off)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(seconds))


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer.strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$")
    return parse(
        "\\boxed{" + text + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


def score_answer(response: str, answer: str, inner_timeout: int | None = None) -> float:
    """1.0 if the last \\boxed{} of `response` equals `answer` by math-verify, else 0.0. Never raises.

    inner_timeout: seconds for each of math-verify's parse/verify calls (signal-based; ignored outside a
    main thread). The hard per-answer timeout is the pool's.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        pred = last_boxed(response)
        if pred is None or not pred.strip() or not answer.strip():
            return 0.0
        t = _signal_timeout(inner_timeout)
        gold = _parse_gold(answer, t)
        target = parse(
            "\\boxed{" + pred + "}",
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=t,
        )
        if not gold or not target:
            return 0.0
        return 1.0 if verify(gold, target, timeout_seconds=t) else 0.0
    except Exception:  # noqa: BLE001 - a verifier error is a wrong answer, never a crashed step
        log.debug("math-verify failed on %r vs %r", response[-200:], answer, exc_info=True)
        return 0.0


def _worker_init() -> None:
    _quiet_math_verify()
    import math_verify  # noqa: F401 - pay the sympy import once, at pool start

    score_answer("\\boxed{1}", "1", 5)


def _ping() -> int:
    import os

    return os.getpid()


# ---------------------------------------------------------------------------------------------
# The pool


ScoreFn = Callable[[str, str, "int | None"], float]


class VerifierPool:
    """Scores (response, answer) pairs in `workers` processes, each answer within `timeout_s` seconds.

    `score_fn(response, answer, inner_timeout) -> float` must be a module-level function (it is pickled
    by reference into 'spawn' workers); default `score_answer`. workers=0 scores in this process
    (no hard timeout; math-verify's signal timeouts only in the main thread).
    """

    def __init__(
        self, workers: int = 2, timeout_s: float = 5.0, score_fn: ScoreFn = score_answer, context: str = "spawn"
    ):
        if workers < 0 or not timeout_s > 0:
            raise ValueError(f"VerifierPool: need workers >= 0 and timeout_s > 0, got {workers}, {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.score_fn = score_fn
        self.context = context
        # math-verify's own per-call timeout, a third of the budget (a pred parse, maybe a gold parse, a verify)
        self.inner_timeout = max(1, int(self.timeout_s // 3))
        self.timeouts = 0  # answers that ran out of time, over the pool's life
        self.restarts = 0
        self._ex: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> VerifierPool:
        """Create the worker processes and wait until every one has imported math-verify (idempotent)."""
        if self.workers == 0 or self._ex is not None:
            return self
        ex = cf.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(self.context), initializer=_worker_init
        )
        # ProcessPoolExecutor starts workers on demand: `workers` simultaneous pings start all of them.
        futs = [ex.submit(_ping) for _ in range(self.workers)]
        done, not_done = cf.wait(futs, timeout=WARM_TIMEOUT_S)
        if not_done:
            self._kill(ex)
            raise RuntimeError(f"math-verify worker pool did not start within {WARM_TIMEOUT_S:.0f} s")
        try:
            for f in done:
                f.result()
        except cf.process.BrokenProcessPool as e:
            self._kill(ex)
            raise RuntimeError(
                "math-verify worker pool could not start: 'spawn' workers re-import the __main__ script, which "
                "must guard its entry point with `if __name__ == '__main__':` (or set task.reward_workers=0)"
            ) from e
        self._ex = ex
        return self

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    @staticmethod
    def _kill(ex: cf.ProcessPoolExecutor) -> None:
        """Kill the executor's workers now (a hung worker never finishes its task by itself)."""
        kill = getattr(ex, "kill_workers", None)  # Python >= 3.14
        procs = list((getattr(ex, "_processes", None) or {}).values())
        if kill is not None:
            kill()
        else:
            for p in procs:
                try:
                    p.kill()
                except Exception:  # noqa: BLE001 - already gone
                    pass
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)

    def _restart(self) -> None:
        if self._ex is not None:
            self._kill(self._ex)
            self._ex = None
        self.restarts += 1
        self.start()

    # -- scoring -----------------------------------------------------------------------------

    def score(self, responses: list[str], answers: list[str]) -> list[float]:
        """Rewards in {0.0, 1.0} for paired lists; an answer slower than timeout_s scores 0.0."""
        if len(responses) != len(answers):
            raise ValueError(f"reward_batch: {len(responses)} responses but {len(answers)} answers")
        if self.workers == 0:
            return [float(self.score_fn(r, a, self.inner_timeout)) for r, a in zip(responses, answers)]
        with self._lock:
            return self._score_pool(responses, answers)

    def _score_pool(self, responses: list[str], answers: list[str]) -> list[float]:
        self.start()
        n = len(responses)
        out = [0.0] * n
        attempts = [0] * n
        pending = collections.deque(range(n))
        inflight: dict[cf.Future, tuple[int, float]] = {}  # future -> (index, deadline)
        suspects: set[int] = set()  # answers in flight when the pool broke: retried one at a time
        while pending or inflight:
            assert self._ex is not None
            # At most `workers` answers in flight, so each one starts running when submitted and its
            # deadline counts from then. A suspect runs alone, so that an answer that kills its
            # worker cannot use up the attempts of an innocent one beside it.
            while pending and len(inflight) < self.workers:
                if inflight and (pending[0] in suspects or any(j in suspects for j, _ in inflight.values())):
                    break
                i = pending.popleft()
                attempts[i] += 1
                fut = self._ex.submit(self.score_fn, responses[i], answers[i], self.inner_timeout)
                inflight[fut] = (i, time.monotonic() + self.timeout_s)
            wait_s = max(0.0, min(d for _, d in inflight.values()) - time.monotonic())
            done, _ = cf.wait(list(inflight), timeout=wait_s, return_when=cf.FIRST_COMPLETED)
            broken = False
            for f in done:
                i, _ = inflight.pop(f)
                try:
                    out[i] = float(f.result())
                except cf.process.BrokenProcessPool:
                    broken = True
                    suspects.add(i)
                    if attempts[i] < MAX_ATTEMPTS:
                        pending.appendleft(i)
                except Exception:  # noqa: BLE001 - a failing verifier scores 0
                    log.debug("verifier raised on answer %d", i, exc_info=True)
                    out[i] = 0.0
            now = time.monotonic()
            expired = [f for f, (_, d) in inflight.items() if d <= now and not f.done()]
            for f in expired:
                i, _ = inflight.pop(f)
                out[i] = 0.0
                self.timeouts += 1
                log.warning("math-verify: answer %d took over %.1f s; scored 0 (pool restarted)", i, self.timeout_s)
            if expired or broken:
                for f, (i, _) in inflight.items():  # answers running on healthy workers: run them again
                    if f.done() and not f.exception():
                        out[i] = float(f.result())
                    else:
                        attempts[i] -= 1  # not their fault
                        pending.appendleft(i)
                inflight.clear()
                self._restart()
        return out


# ---------------------------------------------------------------------------------------------
# Pools shared per process, and the task


_POOLS: dict[tuple, VerifierPool] = {}
_ACTIVE: VerifierPool | None = None


def get_pool(workers: int = 2, timeout_s: float = 5.0, score_fn: ScoreFn = score_answer) -> VerifierPool:
    """The process-wide pool for these settings (created on first use, reused afterwards)."""
    key = (workers, float(timeout_s), score_fn)
    if key not in _POOLS:
        _POOLS[key] = VerifierPool(workers, timeout_s, score_fn)
    return _POOLS[key]


def configure(cfg: TaskConfig) -> VerifierPool:
    """Make the pool of `cfg` (task.reward_workers, task.reward_timeout_s) the one `reward_batch` uses, started."""
    global _ACTIVE
    _ACTIVE = get_pool(cfg.reward_workers, cfg.reward_timeout_s).start()
    return _ACTIVE


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def build(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems from the data files (files.build), and the verifier pool started."""
    problems = files.build(cfg)
    configure(cfg)
    return problems


def reward_batch(responses: list[str], answers: list[str]) -> list[float]:
    """math-verify rewards, (B,) responses and (B,) answers -> (B,) in {0.0, 1.0}, via the configured pool."""
    pool = _ACTIVE if _ACTIVE is not None else configure(TaskConfig())
    return pool.score(responses, answers)
