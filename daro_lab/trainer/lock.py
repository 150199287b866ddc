"""One writer per run: a lock file beside the run's checkpoints, `<checkpoint root>/lock`.

The file holds the owner's pid, host and start time (JSON), for the message that refuses a second writer.
Ownership is an exclusive `fcntl.flock` on the open file, held for as long as the training process lives:
the kernel drops it when the process ends in any way (SIGKILL included), so a lock left by a dead process on
this machine is free and taken over without asking. A lock file written on *another* host cannot be checked
that way (flock over a network filesystem may or may not reach the other machine), so it is refused unless
the caller passes `force` (`daro-lab train --resume ID --force`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from daro_lab.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS: no locking
    fcntl = None  # type: ignore[assignment]


class RunLockedError(ConfigError):
    """Another process owns the run (or may: a lock from another host); the message names it and the lock file."""


def _describe(info: dict) -> str:
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"]))
        if isinstance(info.get("time"), (int, float))
        else "?"
    )
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {when})"


class RunLock:
    """`RunLock(root / "lock", run_id).acquire(force)`; `release()` when the run ends (also on errors)."""

    def __init__(self, path: str | Path, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._fd: int | None = None
        self.previous: dict = {}  # what the lock file said before we took it (a dead owner's pid and host)

    def acquire(self, force: bool = False) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                info = _read_path(self.path)
                if not info and attempt < 99:  # the owner released (or replaced) the file just now: look again
                    time.sleep(0.001)
                    continue
                raise RunLockedError(
                    f"run {self.run_id} is being trained by another process, {_describe(info)} (lock {self.path}); "
                    "a second writer would interleave its steps with that one's: stop it first"
                ) from None
            try:  # the owner we waited for may have removed the file: lock the one at the path, not a stale inode
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunLockedError(
                f"run {self.run_id}: its lock {self.path} kept changing hands in 100 tries; another "
                "process is taking it: stop it first"
            )
        info = _read(fd)
        here = socket.gethostname()
        if info.get("host") not in (None, here) and not force:
            os.close(fd)
            raise RunLockedError(
                f"run {self.run_id} is locked by {_describe(info)} (lock {self.path}); from this host ({here}) it "
                "cannot be told whether that process still runs. If it does not, resume with --force"
            )
        self.previous = info
        self._fd = self._replace(fd, {"pid": os.getpid(), "host": here, "time": time.time(), "run_id": self.run_id})
        return self

    def _replace(self, fd: int, info: dict) -> int:
        """Put a complete lock file holding `info` at the path, locked, in one rename (a reader never sees it half
        written); then let go of the old file `fd`. A process that opened the old file and gets its lock after us
        finds another inode at the path and tries again (`acquire`'s loop)."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        new = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh inode: nobody else holds it
            os.write(new, json.dumps(info).encode())
            os.fsync(new)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(new)
            tmp.unlink(missing_ok=True)
            os.close(fd)
            raise
        os.close(fd)
        return new

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a waiter then finds no file and makes its own)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_path(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
