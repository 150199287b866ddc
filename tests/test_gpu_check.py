"""benchmarks/gpu_check.py (issue 6, item 7) at toy size on the CPU: the script the H100 runs works.

Its figures on a GPU go to benchmarks/results/; here only that every part runs and prints numbers.
"""

import math
import os
import re
import sys
from pathlib import Path

import _procs as procs
import pytest

pytestmark = pytest.mark.slow  # a subprocess building a model

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_part_at_toy_size_on_cpu(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/gpu_check.py"),
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--rows",
        "16",
        "--seq",
        "48",
        "--prompt",
        "8",
        "--chunk",
        "64",
        "--rollout-rows",
        "16",
        "--rollout-tokens",
        "4",
        "--peak-tflops",
        "1",
    ]
    p = procs.run(cmd, cwd=tmp_path, timeout=600, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    ref = re.search(r"reference .*?([\d.]+) s/step, ([\d,]+) tokens/s, MFU ([\d.]+)%", out)
    upd = re.search(r"update .*?([\d.]+) s/step, ([\d,]+) tokens/s, MFU ([\d.]+)%.*loss (\S+), grad norm (\S+)", out)
    roll = re.search(r"rollout .*?([\d,]+) new tokens in ([\d.]+) s", out)
    assert ref and upd and roll, out
    assert float(ref.group(1)) > 0 and float(upd.group(1)) > 0
    assert math.isfinite(float(upd.group(4).rstrip(","))) and float(upd.group(5)) > 0  # a real loss and gradient
    assert 0 < int(roll.group(1).replace(",", "")) <= 16 * 4  # 16 rows, at most 4 new tokens each
