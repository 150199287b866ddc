"""How `train()` stops on SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, Slurm pre-emption) and SIGHUP (the terminal
closed): a checkpoint only ever holds the state at a step boundary, and the run is always marked KILLED. (`daro-lab
eval` and an ablation sweep use the same handlers with `graceful=False`: every signal stops them at once, their run
marked KILLED, exit 128 + the signal's number.)

- The first Ctrl-C of a one-process run asks for a stop at the next step boundary: the current step finishes
  (with its evaluation and checkpoint when they are due), a checkpoint of that boundary is saved, then the
  run stops. A second Ctrl-C, SIGTERM, SIGHUP, or a KeyboardInterrupt raised by code (a hook) stop at once:
  a half-done step is discarded (never saved), and the resume point stays the last checkpoint written.
- Under torchrun every signal stops at once and nothing is saved on the way out (the ranks may be at different
  points of a step); rank 0 marks the run KILLED.
- While the run is created, and while it is being saved and marked on the way out, further signals are
  noted and ignored, so that the run's status is always written (SIGKILL still stops everything).

Handlers are installed only in the main thread (Python delivers signals there) and restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A stop by signal; `signum` says which (a KeyboardInterrupt, so `except KeyboardInterrupt` catches it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):  # pickled back from an ablation's worker process, with train()'s `daro_lab_run`
        return type(self), (self.signum,), self.__dict__


def signal_name(exc: BaseException) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "KeyboardInterrupt"


class StopSignals:
    """Context manager over one train(): `deferred()` around what must not be cut, `check()` at step boundaries,
    `closing = True` once the way out has begun."""

    def __init__(self, graceful: bool = True, echo=None):
        self.graceful = graceful
        self.requested: int | None = None  # a stop asked for at the next step boundary (first Ctrl-C)
        self.closing = False  # on the way out: signals are ignored
        self.raised: int | None = None  # the signal an Interrupted was raised for
        self._deferring = 0
        self._pending: int | None = None
        self._old: dict[int, object] = {}
        self._echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.closing:
            self._echo(f"{name} ignored: saving and marking the run (SIGKILL stops it at once, leaving it RUNNING)")
            return
        if self._deferring:
            self._pending = self._pending or signum
            return
        if signum == signal.SIGINT and self.graceful and self.requested is None:
            self.requested = signum
            self._echo(
                "Ctrl-C: finishing this step, then saving a checkpoint and stopping "
                "(Ctrl-C again stops at once; the unfinished step is discarded)"
            )
            return
        self.closing, self.raised = True, signum
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        """No stop inside; a signal that came meanwhile is acted on at the end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._pending is not None:
            signum, self._pending = self._pending, None
            self._handle(signum, None)

    def check(self) -> None:
        """At a step boundary: stop here if a stop was asked for (or one raised earlier was swallowed by some code)."""
        signum = self.raised or self.requested
        if signum is not None:
            self.closing, self.raised = True, signum
            raise Interrupted(signum)
