"""FairThreads: torch's intra-op threads follow the cores other processes leave free (trainer/threads.py)."""

import subprocess
import sys
import time

import torch

from daro_lab.trainer.threads import _TICKS, FairThreads, _cpu_ticks


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_threads_follow_the_cores_others_leave_free():
    """Fake /proc readings: (all busy ticks, this process's ticks) after each second."""
    before = torch.get_num_threads()
    clock, readings = Clock(), iter([(0, 0), (2 * _TICKS, 2 * _TICKS), (4 * _TICKS, 3 * _TICKS),
                                     (5 * _TICKS, 3 * _TICKS + _TICKS // 2), (7 * _TICKS, 5 * _TICKS + _TICKS // 2)])
    fair = FairThreads(2, cores=2, read=lambda: next(readings), clock=clock)
    try:
        assert fair.adjust() == 2  # the first call has nothing to compare with
        clock.t = 1.0
        assert fair.adjust() == 2 and torch.get_num_threads() == 2  # all the busy time was ours
        clock.t = 2.0
        assert fair.others_cores() == 1.0 and fair.threads == 2  # another process took a core...
        clock.t = 3.0
        assert fair.adjust() == 1 and torch.get_num_threads() == 1  # ...half a core or more: one thread fewer
        clock.t = 4.0
        assert fair.adjust() == 2  # it went away
    finally:
        torch.set_num_threads(before)


def test_never_fewer_than_one_nor_more_than_it_started_with():
    clock, readings = Clock(), iter([(0, 0), (64 * _TICKS, 0), (64 * _TICKS, 0)])
    before = torch.get_num_threads()
    fair = FairThreads(4, cores=8, read=lambda: next(readings), clock=clock)
    try:
        fair.adjust()
        clock.t = 1.0
        assert fair.adjust() == 1  # 64 busy cores of others on 8: still one thread
        clock.t = 2.0
        assert fair.adjust() == 4  # an idle 8-core machine: the 4 it started with, not 8
        no_proc = FairThreads(2, read=lambda: None)
        assert no_proc.adjust() == 2 and no_proc.others_cores() is None
    finally:
        torch.set_num_threads(before)


def test_a_real_busy_process_is_seen_on_this_machine():
    if _cpu_ticks() is None:
        import pytest

        pytest.skip("no /proc here")
    fair = FairThreads(2, cores=2)
    fair.others_cores()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        seen = fair.others_cores()
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.6, seen  # one core, less what the scheduler gave to others
