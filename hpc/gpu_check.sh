#!/usr/bin/env bash
# Check a GPU node for aidetect in under 8 minutes and write one JSON of what it found: the GPU(s), the
# torch/CUDA versions, the outcome of the `gpu` tests, and the training-loop and data-path benches.
#
#   bash hpc/gpu_check.sh [OUT.json]                  # default gpu_check.json
#   PYTHON=python3 PYTHONPATH=/opt/deps bash hpc/gpu_check.sh /tmp/gpu_check.json
#
# Settings, from the environment:
#   PYTHON              the interpreter (default .venv/bin/python, else python3); the repository's src/ goes
#                       first on PYTHONPATH, so the checkout is what runs, installed or not
#   GPU_CHECK_TESTS     where to look for gpu tests (default tests)
#   GPU_CHECK_BENCH=0   skip the benches
#   GPU_CHECK_BUDGET_S  the time all steps may take together (default 450)
#   GPU_CHECK_KEEP=1    keep the scratch folder (logs, test runs, synthetic images) and say where it is
#
# Without a visible GPU it says so, runs the gpu tests (all listed as skipped), skips the benches and
# writes the JSON with "gpu": null. Exit 1 when a gpu test or a bench failed or hung, else 0.
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
        record "$name" "out of time" 0 -1
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
    record "$name" "$status" $((SECONDS - started)) "$rc"
}

record() { # record NAME STATUS SECONDS EXIT_CODE
    printf '{"step": "%s", "status": "%s", "seconds": %d, "exit_code": %d}\n' "$@" >>"$work/steps.jsonl"
}

# What this node has, as torch sees it (CUDA_VISIBLE_DEVICES applies; nvidia-smi would list every GPU).
probe() {
    "$PYTHON" - "$work/env.json" <<'EOF'
import json, platform, shutil, socket, subprocess, sys

import torch

gpus = []
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
env = {
    "host": socket.gethostname(),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
    "gpus": gpus,
    "bf16": bool(gpus) and torch.cuda.is_bf16_supported(),
    "driver": None,
}
if gpus and shutil.which("nvidia-smi"):  # the driver version, which torch does not report
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    if result.returncode == 0 and result.stdout.strip():
        env["driver"] = result.stdout.split()[0]
json.dump(env, open(sys.argv[1], "w"), indent=1)
for index, gpu in enumerate(gpus):
    print(f"GPU {index}: {gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB)")
print(f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, "
      f"driver {env['driver']}, Python {env['python']}")
EOF
}

gpu_tests() {
    # --basetemp: a folder of our own, so that this session neither cleans up nor is cleaned up by another
    # pytest session of the same user; no cache provider: nothing written into the repository.
    # GPU_CHECK_TESTS is unquoted on purpose: it may name several paths.
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider --basetemp "$work/pytest" \
        --junitxml "$work/tests.xml" ${GPU_CHECK_TESTS:-tests}
}

bench_train() { # bench_train MODEL SIZE BATCH STEPS AMP
    "$PYTHON" -m aidetect.cli bench train --model "$1" --image-size "$2" --batch-size "$3" --steps "$4" \
        --precisions "fp32,$5" --json "$work/bench_train_$1.json"
}

# Camera-sized synthetic photos (1200..4000 px sides, as phones and DSLRs write them), a few per core:
# enough for stable pack rates, few enough to make in about a minute. The loader is timed over at least
# 1024 images per worker, so that starting 16+ workers and filling their pipeline does not dominate.
bench_data() {
    local cores n
    cores=$(nproc)
    n=$((cores * 6 < 48 ? 48 : cores * 6 > 192 ? 192 : cores * 6))
    "$PYTHON" -m aidetect.cli synth "$work/raw" --n "$n" --min-side 1200 --max-side 4000 --workers "$cores"
    "$PYTHON" -m aidetect.cli bench data --src "$work/raw" --shards "$work/shards" --workers "$cores" \
        --naive-limit 48 --min-images $((cores * 1024 < 4096 ? 4096 : cores * 1024)) --json "$work/bench_data.json"
}

# One JSON from the step records, the probe, pytest's JUnit XML and the benches' own JSON; prints the
# summary and exits 1 when a gpu test or a bench failed or hung.
combine() {
    "$PYTHON" - "$work" "$out" "$1" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, bench_skipped = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
status = {s["step"]: s for s in steps}
env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
gpus = env.get("gpus") or []


def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None


tests = {"status": status.get("gpu-tests", {}).get("status", "not run")}
if (work / "tests.xml").is_file():  # one <testcase> per test (and per collection error)
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    reasons, failures = [], []
    for case in ET.parse(work / "tests.xml").getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif (skipped := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reasons.append(skipped.get("message", ""))
        else:
            counts["passed"] += 1
    tests |= counts | {"skip_reasons": sorted(set(reasons)), "failures": failures}

if bench_skipped:
    bench = {"skipped": bench_skipped}
else:
    bench = {
        "train": {
            "seed_cnn2@128": read("bench_train_seed_cnn2.json"),
            "resnet50@224": read("bench_train_resnet50.json"),
        },
        "data": read("bench_data.json"),
    }

gpu = None
if gpus:
    gpu = {"name": gpus[0]["name"], "count": len(gpus), "devices": gpus, "bf16": env["bf16"]}
report = {
    "gpu": gpu,
    "host": env.get("host"),
    "python": env.get("python"),
    "torch": env.get("torch"),
    "cuda": env.get("cuda"),
    "cudnn": env.get("cudnn"),
    "nccl": env.get("nccl"),
    "driver": env.get("driver"),
    "tests": tests,
    "bench": bench,
    "steps": steps,
    "seconds": sum(s["seconds"] for s in steps),
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")

# A failed or hung step is a failure, and so is a failed gpu test; a bench skipped for want of time is
# only reported.
bad = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
if "gpu-tests" not in bad and (tests["status"] != "ok" or tests.get("failed") or tests.get("errors")):
    bad.append("gpu-tests")

print("\n== summary")
print("GPU:", f"{gpu['count']} x {gpu['name']}" if gpu else "none visible",
      f"| torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}")
if "passed" in tests:
    print(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
          f"{tests['skipped']} skipped")
    for reason in tests["skip_reasons"]:
        print(f"  skipped: {reason}")
    for name in tests["failures"]:
        print(f"  FAILED: {name}")
else:
    print(f"gpu tests: {tests['status']}, no results")
if "skipped" in bench:
    print(f"benches: skipped ({bench['skipped']})")
else:
    for name, figures in bench["train"].items():
        if figures:
            best = max(figures["settings"].items(), key=lambda item: item[1])
            print(f"bench train {name}: loop_overhead_ratio {figures['loop_overhead_ratio']:.3f} (target >= 0.95), "
                  f"fastest {best[0]} {best[1]:.0f} img/s")
        else:
            print(f"bench train {name}: no figures")
    data = bench["data"]
    if data:
        print(f"bench data: pack {data['pack_img_per_s']:.1f} img/s (vs floor {data['pack_vs_floor']:.2f}), "
              f"load {data['load_img_per_s']:.0f} img/s (vs floor {data['load_vs_floor']:.2f}, "
              f"{data['load_vs_naive']:.0f}x naive) with {data['workers']} workers")
    else:
        print("bench data: no figures")
for step in steps:
    if step["status"] != "ok":
        print(f"step {step['step']}: {step['status']}")
print(f"{'FAILED: ' + ', '.join(bad) if bad else 'all passed'}; written to {out} ({report['seconds']} s)")
sys.exit(1 if bad else 0)
EOF
}

export PYTHON work
export -f probe gpu_tests bench_train bench_data

main() {
    local bench_skipped="" amp
    echo "gpu_check: $PYTHON in $repo; JSON to $out"
    run_step probe 120 probe
    if [ ! -f "$work/env.json" ]; then
        echo "gpu_check: torch failed with $PYTHON (set PYTHON, and PYTHONPATH for missing packages)" >&2
        bench_skipped="torch failed to start"
    elif ! grep -q '"capability"' "$work/env.json"; then
        echo "gpu_check: no GPU visible to torch: the gpu tests will be listed as skipped; benches skipped"
        bench_skipped="no GPU visible"
    elif [ "${GPU_CHECK_BENCH:-1}" = 0 ]; then
        bench_skipped="GPU_CHECK_BENCH=0"
    fi

    run_step gpu-tests 300 gpu_tests
    if [ -z "$bench_skipped" ]; then
        # The mixed precision a run's `precision: auto` would pick: bf16 where supported (A100, H100), else
        # fp16 with GradScaler (V100).
        if grep -q '"bf16": true' "$work/env.json"; then amp=bf16; else amp=fp16; fi
        # Steps sized for about 15 s per model on an H100/H200: seed_cnn2 does ~200 steps/s there.
        run_step bench-train-seed_cnn2 90 bench_train seed_cnn2 128 32 500 "$amp"
        run_step bench-train-resnet50 150 bench_train resnet50 224 64 50 "$amp"
        run_step bench-data 180 bench_data
    fi
    combine "$bench_skipped"
}

main
