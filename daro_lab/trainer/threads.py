"""Torch's intra-op threads, fair to the other processes on the machine.

Why: torch's CPU kernels run their parallel regions on OpenMP threads that meet at a barrier after every op. When
another process keeps a core busy, the thread on that core is descheduled for a whole time slice while the others
wait at the barrier; a tiny model runs thousands of short ops a step, so on 2 cores one busy process made a step
3-4x slower (measured: 0.27 s idle, 0.91 s beside `python -c "while True: pass"`), where a fair share would be 2x.
One thread beside the busy process loses nothing (0.34 s idle, 0.32 s beside it): it never waits for a
descheduled partner. `OMP_WAIT_POLICY=PASSIVE` fixes the waiting too but slows every idle step, and it must be set
before torch is imported.

So, before each step, `FairThreads.adjust()` reads how many cores the *other* processes used since the last call
(all CPU time from /proc/stat less this process's own from /proc/self/stat) and sets torch's thread count to the
cores they leave free (at least 1, at most the count it started with). Where /proc cannot be read it does nothing.

Numbers: the thread count decides how some kernels split their work, so on large models it can change float
rounding; on the presets here steps agree bit for bit at 1 and 2 threads. `trainer.threads = N` fixes the count
(no adjustment) for runs that must be reproducible to the bit whatever the machine's load.
"""

from __future__ import annotations

import os
import time

import torch

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, ticks of this process and its waited-for children), or None without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal: guest is inside user
    return busy, sum(int(x) for x in mine[11:15])  # utime stime cutime cstime


class FairThreads:
    """`adjust()` before each step: torch's intra-op threads = the machine's cores less those other processes kept
    busy since the last call (at least 1, at most `max_threads`); returns the count set."""

    def __init__(self, max_threads: int, cores: int | None = None, read=_cpu_ticks, clock=time.monotonic):
        self.max_threads = max(1, max_threads)
        self.cores = cores or os.cpu_count() or self.max_threads  # what /proc/stat counts
        self._read, self._clock = read, clock
        self._last = None
        self.threads = self.max_threads

    def others_cores(self) -> float | None:
        """Cores the other processes kept busy since the last call (None on the first call or without /proc)."""
        now, ticks = self._clock(), self._read()
        last, self._last = self._last, (now, ticks) if ticks is not None else None
        if last is None or ticks is None or now - last[0] <= 0:
            return None
        busy, mine = ticks[0] - last[1][0], ticks[1] - last[1][1]
        return max(0.0, (busy - mine) / _TICKS / (now - last[0]))

    def adjust(self) -> int:
        others = self.others_cores()
        if others is not None:
            free = self.cores - int(others + 0.5)  # a process using half a core or more takes one
            self.threads = max(1, min(self.max_threads, free))
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads
