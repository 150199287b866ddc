"""The process hygiene of the test suite itself: trees are killed whole, and a session that leaves a process running
fails naming it (conftest.pytest_sessionfinish)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import _procs as procs
import pytest

HERE = Path(__file__).parent


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_timed_out_command_loses_its_whole_tree_even_a_child_in_a_session_of_its_own(tmp_path):
    """As torchrun's ranks: a grandchild started with setsid, outside the child's process group."""
    pidfile = tmp_path / "grandchild"
    code = (
        f"import subprocess, time; p = subprocess.Popen(['setsid', 'sleep', '300']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    )
    try:
        procs.run([sys.executable, "-c", code], timeout=3)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise AssertionError("no timeout")
    time.sleep(0.2)
    assert not _alive(int(pidfile.read_text()))


@pytest.mark.slow
def test_a_session_that_leaves_a_process_running_fails_and_names_it(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(HERE / "_procs.py", tmp_path / "_procs.py")
    pidfile = tmp_path / "left"
    (tmp_path / "test_leak.py").write_text(
        "import subprocess\n"
        "def test_leaks():\n"
        f"    p = subprocess.Popen(['setsid', 'sleep', '300'])\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
    )
    r = procs.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_leak.py")],
        timeout=120,
        cwd=tmp_path,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "1 passed" in out, out[-2000:]
    assert "left running (killed now)" in out and "sleep 300" in out, out[-2000:]
    time.sleep(0.2)
    assert not _alive(int(pidfile.read_text()))
