"""Processes a test starts, and everything they start, are gone when the test ends, however it ends.

torchrun starts every rank in a session of its own (setsid), and vLLM its workers: killing the child's process
group leaves those running (a timed-out torchrun test once left a rank training for an hour after CI). So the tree
is found by parent pid, from /proc, and killed whole:

    p = run([...], timeout=600, cwd=...)        # subprocess.run's result; on timeout the whole tree is killed
    with started([...], stdout=PIPE) as proc:   # a Popen; on leaving the block the whole tree is killed
        ...

`leftovers(marker)` lists the live processes whose environment holds `marker` (conftest and .ci/run use it to
fail a test session that left any behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def _parents() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    found, grew = set(roots), True
    while grew:
        kids = {c for c, pp in parents.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return found


def kill_all(pids: set[int]) -> None:
    """SIGKILL `pids` and their descendants: stopped first (SIGSTOP), so none can start another while the tree is
    read (a child forked meanwhile is caught on the next pass), then killed together."""
    seen: set[int] = set()
    for _ in range(5):
        new = _descendants(seen | set(pids), _parents()) - seen
        if not new:
            break
        for p in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGSTOP)
        seen |= new
    for p in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def kill_tree(pid: int) -> None:
    kill_all({pid})


@contextlib.contextmanager
def started(cmd, **kw):
    """Popen(cmd, start_new_session=True, **kw); when the block ends its whole tree is killed: every process that
    carries the block's marker in its environment (re-parented orphans too) and their descendants."""
    marker = f"daro-lab-test-tree-{uuid.uuid4().hex}"
    kw["env"] = {**(kw.get("env") or os.environ), "DARO_LAB_TEST_TREE": marker}
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        alive = {proc.pid} if proc.poll() is None else set()
        kill_all(alive | {int(x.split()[0]) for x in leftovers(marker)})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def run(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw) whose whole tree is killed when
    the command ends (its orphans: a rank of a failed torchrun), times out (TimeoutExpired, with what the command
    printed) or the test is interrupted. Output goes through files, so an orphan holding a pipe cannot stall it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        timed_out = False
        with started(cmd, stdout=out, stderr=err, **kw) as proc:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        text = [f.seek(0) or f.read().decode(errors="replace") for f in (out, err)]
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=text[0], stderr=text[1])
    return subprocess.CompletedProcess(cmd, proc.returncode, *text)


# multiprocessing's own helpers (a pool's workers, its resource tracker): they end when the process that owns them
# does, so at the end of a test session they are the session's, not a test's leftovers
MULTIPROCESSING_HELPERS = (
    "from multiprocessing.resource_tracker import",
    "from multiprocessing.spawn import",
    "from multiprocessing.forkserver import",
)


def leftovers(marker: str, exclude: set[int] = frozenset(), ignore: tuple[str, ...] = ()) -> list[str]:
    """'pid cmdline' of every live process (zombies aside) whose environment holds `marker`, except those whose
    command line holds one of `ignore`."""
    me = os.getpid()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in exclude or int(p.name) == me:
            continue
        try:
            if marker.encode() not in (p / "environ").read_bytes():
                continue
            if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(x in cmd for x in ignore):
            continue
        found.append(f"{p.name} {cmd[:200]}")
    return found


def wait_gone(
    marker: str, exclude: set[int] = frozenset(), seconds: float = 10.0, ignore: tuple[str, ...] = ()
) -> list[str]:
    """leftovers(marker) once they have had `seconds` to exit (a process killed just now takes a moment)."""
    deadline = time.time() + seconds
    while (left := leftovers(marker, exclude, ignore)) and time.time() < deadline:
        time.sleep(0.2)
    return left
