"""Torch's intra-op threads, fair to the other processes on the machine: `trainer.threads = 0` is resolved once, when
the trainer is built, to the cores the other processes leave free.

Why: torch's CPU kernels run their parallel regions on OpenMP threads that meet at a barrier after every op. When
another process keeps a core busy, the thread on that core is descheduled for whole time slices while the others
wait at the barrier; a tiny model runs thousands of short ops a step, so on 2 cores one busy process made a step
3-4x slower (measured: 0.27 s idle, 0.76-0.91 s beside `python -c "while True: pass"`), where a fair share would be
2x. One thread beside the busy process loses nothing (0.34 s idle, 0.32 s beside it): it never waits for a
descheduled partner. Load that arrives after the run started is met by OpenMP's spin count, not here: daro_lab sets
`GOMP_SPINCOUNT=1000` before torch loads (daro_lab/__init__.py), so a waiting thread sleeps soon instead of spinning
300,000 rounds; a 2-thread run beside a later busy process then runs 1.9x its idle step, not 3.5x, at no idle cost
(`OMP_WAIT_POLICY=PASSIVE`, spin count 0, is as fair but slows every idle step by about 25%). Both figures:
`benchmarks/bench_trainer.py --busy --spin-counts 300000,1000,0`, results in benchmarks/results/.

Why once, not every step: the thread count decides how some kernels split their sums, so it changes float rounding
(two runs of the small test preset at 1 and 2 threads differed by 1e-7 after a few steps, and sampling then
diverges). Resolved at the start and written into the run's config (`trainer.threads` as logged), the count is part
of what the run ran: a resume reads it back, and the same logged config and seed give the same numbers. The spin
count changes no number, only how long a waiting thread holds its core. `trainer.threads = N` fixes the count
whatever the load.
"""

from __future__ import annotations

import os
import time

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


def others_cores(seconds: float = 0.2, read=_cpu_ticks, clock=time.monotonic, sleep=time.sleep) -> float | None:
    """How many cores the other processes kept busy over the next `seconds` (None without /proc)."""
    t0, a = clock(), read()
    sleep(seconds)
    t1, b = clock(), read()
    if a is None or b is None or t1 <= t0:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / _TICKS / (t1 - t0))


def fair_threads(max_threads: int, others: float | None, cores: int | None = None) -> int:
    """The machine's cores less those the others keep busy (a process using half a core or more takes one), at least
    1 and at most `max_threads` (torch's default); `max_threads` when the load is unknown."""
    if others is None:
        return max(1, max_threads)
    cores = cores or os.cpu_count() or max_threads  # what /proc/stat counts
    return max(1, min(max_threads, cores - int(others + 0.5)))
