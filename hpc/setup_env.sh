#!/usr/bin/env bash
# Create a virtual environment and install aidetect (with its test tools) into it.
#
#   bash hpc/setup_env.sh                 # ./.venv, for a workstation, a laptop or CI
#   AIDETECT_VENV=$HOME/envs/aidetect bash hpc/setup_env.sh   # e.g. on a cluster login node
#
# Safe to re-run: an existing environment is reused and only what is missing gets installed.
# PYTHON picks the interpreter (default python3, >= 3.10); PIP_EXTRA_INDEX_URL can point pip at
# a PyTorch wheel index for a specific CUDA version.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AIDETECT_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo[dev]"
"$venv/bin/python" -c "import aidetect, torch; print(f'aidetect {aidetect.__version__}, torch {torch.__version__} in $venv')"
