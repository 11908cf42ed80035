#!/usr/bin/env bash
# Check a GPU node for aidetect in under 8 minutes and write one JSON of what it found: the GPU(s), the
# torch/CUDA versions, `aidetect doctor`'s checks, the outcome of the `gpu` tests, and the training-loop
# and data-path benches (ResNet-50 fed by the loader, the loader against its decode floor, nvJPEG).
#
#   bash hpc/gpu_check.sh [OUT.json]                  # default gpu_check.json
#   PYTHON=python3 PYTHONPATH=/opt/deps bash hpc/gpu_check.sh /tmp/gpu_check.json
#
# Settings, from the environment:
#   PYTHON              the interpreter (default .venv/bin/python, else python3); the repository's src/ goes
#                       first on PYTHONPATH, so the checkout is what runs, installed or not
#   GPU_CHECK_TESTS     where to look for gpu tests (default tests/test_gpu.py, which needs neither submitit
#                       nor wandb: the rest of the suite does)
#   GPU_CHECK_WORKERS   loader processes of the benches (default: the cores, at most 16)
#   GPU_CHECK_BENCH=0   skip the benches
#   GPU_CHECK_BUDGET_S  the time all steps may take together (default 450)
#   GPU_CHECK_KEEP=1    keep the scratch folder (logs, test runs, synthetic images) and say where it is
#
# Without a visible GPU it says so, runs the gpu tests (all listed as skipped), skips the benches and
# writes the JSON with "gpu": null. Exit 1, with the reasons under "failures" in the JSON, when a step
# failed, was cut at its time limit or was not run for want of time, when a gpu test failed or none was
# collected, or when a GPU is visible and every gpu test skipped; else 0.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-gpu_check.json}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac # the caller's folder, before we move to the repository
cd "$repo"

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
# No tracking: the check is about the GPU paths, wandb's start costs seconds per run, and a node whose
# Python lacks wandb can still be checked.
export WANDB_MODE="${WANDB_MODE:-disabled}"
budget_s="${GPU_CHECK_BUDGET_S:-450}"      # the steps' share of 8 minutes; the rest is start-up and the JSON
tests="${GPU_CHECK_TESTS:-tests/test_gpu.py}"
cores=$(nproc)
workers="${GPU_CHECK_WORKERS:-$((cores < 16 ? cores : 16))}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"

cleanup() {
    if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "gpu_check: scratch kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# run_step NAME CAP_S CMD...: CMD (a function below) under `timeout`, for at most CAP_S and what is left
# of the budget, its output to the terminal and to $work/NAME.log, its outcome as one line of
# $work/steps.jsonl. A hung step is killed, child processes included (timeout signals its whole process
# group), rather than eating the budget of the steps after it. timeout runs programs, not functions: the
# functions are exported and run by a child bash.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget_s - SECONDS)) started=$SECONDS rc=0 status
    if ((left < 20)); then
        echo "== $name: skipped, out of time (GPU_CHECK_BUDGET_S=$budget_s)"
        record "$name" "out of time" 0 -1 $((left < 0 ? 0 : left))
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (at most ${limit} s)"
    set +e
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" 2>&1 | tee "$work/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" $((SECONDS - started)) "$rc" "$limit"
}

record() { # record NAME STATUS SECONDS EXIT_CODE LIMIT_S
    printf '{"step": "%s", "status": "%s", "seconds": %d, "exit_code": %d, "limit_s": %d}\n' "$@" >>"$work/steps.jsonl"
}

# What this node has, as torch sees it (CUDA_VISIBLE_DEVICES applies; nvidia-smi would list every GPU), as
# JSON for the report, then `aidetect doctor`'s checks (versions, GPUs, the build's kernels, precision),
# in one Python process.
probe() { "$PYTHON" -m aidetect.bench.gpu_check probe "$work/env.json"; }

gpu_tests() {
    # --basetemp: a folder of our own, so that this session neither cleans up nor is cleaned up by another
    # pytest session of the same user; no cache provider: nothing written into the repository.
    # $tests is unquoted on purpose: it may name several paths.
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider --basetemp "$work/pytest" \
        --junitxml "$work/tests.xml" $tests
}

bench_train() { # bench_train MODEL SIZE BATCH STEPS [OPTION...]: fp32 and the precision `auto` picks
    local model=$1 size=$2 batch=$3 steps=$4
    shift 4
    "$PYTHON" -m aidetect.cli bench train --model "$model" --image-size "$size" --batch-size "$batch" \
        --steps "$steps" --precisions fp32,auto --json "$work/bench_train_$model.json" "$@"
}

# Camera-sized synthetic photos (1200..4000 px sides, as phones and DSLRs write them), 6 per worker:
# enough for stable pack rates, few enough to make in about a minute. The loader is timed over at least
# 1024 images per worker, so that starting 16 workers and filling their pipeline does not dominate; its
# pack then feeds ResNet-50 in bench-train-resnet50.
bench_data() {
    local n=$((workers * 6 < 48 ? 48 : workers * 6 > 192 ? 192 : workers * 6))
    "$PYTHON" -m aidetect.cli synth "$work/raw" --n "$n" --min-side 1200 --max-side 4000 --workers "$workers"
    "$PYTHON" -m aidetect.cli bench data --src "$work/raw" --shards "$work/shards" --workers "$workers" \
        --naive-limit 32 --min-images $((workers * 1024 < 4096 ? 4096 : workers * 1024)) --json "$work/bench_data.json"
}

export PYTHON work tests workers
export -f probe gpu_tests bench_train bench_data

# Why the benches do not run ("" when they do).
bench_skipped() {
    if [ ! -f "$work/env.json" ]; then
        echo "the node was not probed"
    elif ! grep -q '"capability"' "$work/env.json"; then
        echo "no GPU visible"
    elif [ "${GPU_CHECK_BENCH:-1}" = 0 ]; then
        echo "GPU_CHECK_BENCH=0"
    fi
}

main() {
    local skipped
    echo "gpu_check: $PYTHON in $repo; JSON to $out"
    run_step probe 60 probe
    skipped=$(bench_skipped)
    if [ "$skipped" = "no GPU visible" ]; then
        echo "gpu_check: no GPU visible to torch: the gpu tests will be listed as skipped; benches skipped"
    fi
    run_step gpu-tests 240 gpu_tests
    if [ -z "$skipped" ]; then
        # Sized from the H200 figures (README, "Training-loop benchmark"): seed_cnn2 ~200 steps/s at batch 32
        # (6 timed loops of 500 steps: ~15 s), ResNet-50 ~2,800 img/s in bf16, ~2,000 in fp32 (7 loops of 35
        # steps at batch 256, the last fed by the loader: ~30 s); each cap is about twice the estimate.
        run_step bench-train-seed_cnn2 60 bench_train seed_cnn2 128 32 500
        run_step bench-data 150 bench_data
        run_step bench-train-resnet50 90 bench_train resnet50 224 256 30 --data "$work/shards" --workers "$workers"
    fi
    "$PYTHON" -m aidetect.bench.gpu_check report "$work" "$out" --tests "$tests" ${skipped:+--bench-skipped "$skipped"}
}

main
