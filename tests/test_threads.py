"""trainer.threads = 0: torch's intra-op threads are the cores other processes leave free when the run starts,
resolved once and logged with the config (trainer/threads.py)."""

import subprocess
import sys

import pytest
from _procs import run

from daro_lab.trainer.threads import _TICKS, _cpu_ticks, fair_threads, others_cores


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_others_cores_is_all_busy_time_less_this_process():
    clock = Clock()
    readings = iter([(0, 0), (3 * _TICKS, _TICKS)])  # over 2 s: 3 core-seconds busy, 1 of them ours
    assert others_cores(2.0, read=lambda: next(readings), clock=clock, sleep=clock.sleep) == pytest.approx(1.0)
    assert others_cores(0.1, read=lambda: None, clock=clock, sleep=clock.sleep) is None


def test_threads_are_the_free_cores_within_one_and_the_default():
    assert fair_threads(2, 0.0, cores=2) == 2
    assert fair_threads(2, 0.4, cores=2) == 2  # less than half a core: not taken
    assert fair_threads(2, 1.0, cores=2) == 1
    assert fair_threads(2, 7.0, cores=2) == 1  # never fewer than one
    assert fair_threads(4, 2.0, cores=64) == 4  # never more than torch's default
    assert fair_threads(8, 60.0, cores=64) == 4
    assert fair_threads(2, None) == 2  # load unknown: the default


def test_a_real_busy_process_is_seen_and_the_run_logs_the_count_it_took(small_env, tmp_path):
    from daro_lab.config import load_config
    from daro_lab.trainer import Trainer

    if _cpu_ticks() is None:
        pytest.skip("no /proc here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = others_cores(1.0)
        cfg = load_config(None, [*[o for o in small_env if not o.startswith("trainer.threads")], "trainer.threads=0"])
        Trainer(cfg)
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.6, seen  # one core, less what the scheduler gave to others
    assert cfg.trainer.threads >= 1 and cfg.flat()["trainer.threads"] == cfg.trainer.threads  # resolved, logged
    import os

    if (os.cpu_count() or 1) == 2:  # on 2 cores the busy process takes one
        assert cfg.trainer.threads == 1


@pytest.mark.parametrize(
    "preset, first, expected",
    [
        (None, "daro_lab", "1000"),  # daro-lab's default, set before torch loads libgomp
        ("7", "daro_lab", "7"),  # the user's own value is kept
        (None, "torch", "None"),  # torch came first: libgomp has read its environment already, nothing is claimed
    ],
)
def test_importing_daro_lab_before_torch_sets_openmp_spin_count_once(preset, first, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = f"import {first}, daro_lab, torch, os; print(daro_lab.SPINCOUNT, os.environ.get('GOMP_SPINCOUNT'))"
    out = run([sys.executable, "-c", code], timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, expected]
