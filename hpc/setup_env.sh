#!/usr/bin/env bash
# Create a virtual environment and install aidetect (with its test tools) into it, with a PyTorch
# build that has CUDA kernels for the GPUs it will run on.
#
#   bash hpc/setup_env.sh                          # ./.venv; GPUs detected with nvidia-smi, if any
#   bash hpc/setup_env.sh --profile expanse        # the GPUs a cluster profile names (gpu_arch: sm_70)
#   bash hpc/setup_env.sh --gpu-arch sm_70         # name them yourself (e.g. on a login node)
#   AIDETECT_VENV=$HOME/envs/aidetect bash hpc/setup_env.sh --profile expanse   # an Expanse login node
#
# PyTorch 2.14's default wheels (PyPI, CUDA 13) have no kernels for Volta (sm_70, Expanse's V100s);
# src/aidetect/cuda_builds.py says which build does, and this script installs it from PyTorch's wheel
# index, then pins torch in the environment's pip.conf so that a later `pip install` cannot silently
# replace it with a build that drops these GPUs. Safe to re-run: an existing environment is reused.
# PYTHON picks the interpreter (default python3, >= 3.10).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AIDETECT_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
arch=""
profile=""

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu-arch) arch=${2:?--gpu-arch needs a value, e.g. sm_70}; shift 2 ;;
        --profile) profile=${2:?--profile needs a name or a path}; shift 2 ;;
        *) usage ;;
    esac
done

profile_arch() {  # the gpu_arch key of a cluster profile (a name of the bundled ones, or a path)
    local path=$1
    [ -f "$path" ] || path="$repo/src/aidetect/profiles/$1.yaml"
    [ -f "$path" ] || { echo "setup_env: profile $1 not found" >&2; exit 2; }
    sed -n 's/^gpu_arch:[[:space:]]*\([A-Za-z0-9_.]*\).*/\1/p' "$path"
}

detected_arch() {  # the compute capability of this machine's first GPU, e.g. 7.0, if it has one
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' '
}

[ -n "$arch" ] || [ -z "$profile" ] || arch=$(profile_arch "$profile")
[ -n "$arch" ] || arch=$(detected_arch)

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if [ -n "$arch" ]; then
    read -r variant torch_req vision_req index < <("$python" "$repo/src/aidetect/cuda_builds.py" "$arch")
    echo "setup_env: GPUs $arch -> PyTorch's $variant build"
    if [ "$index" != "-" ]; then
        "${pip[@]}" install --quiet "$torch_req" "$vision_req" --index-url "$index"
    fi
fi
"${pip[@]}" install --quiet -e "$repo[dev]"

# Pin the torch that is now installed (with its local version, e.g. +cu126) for every later pip run.
pin=$("$venv/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))")
echo "$pin" > "$venv/aidetect-constraints.txt"
printf '[install]\nconstraint = %s\n' "$venv/aidetect-constraints.txt" > "$venv/pip.conf"
"$venv/bin/python" -c "import aidetect, torch; print(f'aidetect {aidetect.__version__}, torch {torch.__version__} \
(CUDA kernels: {\" \".join(torch.cuda.get_arch_list()) or \"none\"}) in $venv; pinned $pin')"
