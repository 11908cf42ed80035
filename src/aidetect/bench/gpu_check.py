"""The Python side of ``hpc/gpu_check.sh``: the probe of the node, and the check's report with its verdict.

``probe``: what the node has (versions, GPUs) as JSON, then ``aidetect doctor``'s checks, in one process.
``report``: one report of the check, from what the script's steps left in its scratch folder.

The verdict is honest: the check fails when a step failed, was cut at its time limit or was not run for
want of time, when a gpu test failed or none was collected, and when a GPU is visible but every gpu test
skipped (a check that tested nothing). Without a GPU, gpu tests that all skip are the expected outcome.

    python -m aidetect.bench.gpu_check probe ENV.json
    python -m aidetect.bench.gpu_check report WORK OUT.json --tests PATHS [--bench-skipped REASON]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 15


def node_facts() -> dict[str, Any]:
    """``doctor``'s versions of this node, cuDNN's, and the GPUs as torch sees them (``CUDA_VISIBLE_DEVICES``
    applies) with their compute capability and the precision ``train.precision: auto`` picks on each; the
    driver's version from nvidia-smi (torch does not report it), None without one."""
    import torch

    from aidetect.doctor import node_versions
    from aidetect.hardware import auto_precision

    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "precision_auto": auto_precision("cuda", (p.major, p.minor)),
            }
        )
    return node_versions() | {
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": driver_version() if gpus else None,
        "gpus": gpus,
    }


def driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    return result.stdout.split()[0] if result.returncode == 0 and result.stdout.strip() else None


def junit_outcome(path: Path) -> dict[str, Any] | None:
    """Counts of pytest's JUnit XML (one ``<testcase>`` per test and per collection error), the skip
    reasons and the failing tests' names; None when pytest wrote none."""
    if not path.is_file():
        return None
    counts = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    reasons, failures = set(), []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = "::".join(part for part in (case.get("classname"), case.get("name")) if part)
        counts["collected"] += 1
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif (skipped := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reasons.add(skipped.get("message", ""))
        else:
            counts["passed"] += 1
    return counts | {"skip_reasons": sorted(reasons), "failures": failures}


def step_problem(step: dict[str, Any]) -> str:
    """Why a step whose status is not ``ok`` fails the check, in one line."""
    name, status = step["step"], step["status"]
    if status == "timeout":
        return f"{name}: cut at its time limit of {step['limit_s']} s (exit {step['exit_code']})"
    if status == "out of time":
        return f"{name}: not run, out of time ({step['limit_s']} s of GPU_CHECK_BUDGET_S left)"
    return f"{name}: failed (exit {step['exit_code']}; its log_tail says why)"


def problems(steps: list[dict[str, Any]], tests: dict[str, Any], gpu_visible: bool) -> list[str]:
    """Every reason the check failed, one line each (empty: it passed). ``tests``: the gpu tests' step
    status and paths, with ``junit_outcome``'s counts when pytest wrote them. ``gpu_visible``: whether the
    probe saw a GPU, where gpu tests that all skip tested nothing."""
    found = [step_problem(step) for step in steps if step["status"] != "ok"]
    if "collected" not in tests:  # no results: the gpu-tests step did not finish, as said above
        return found
    if tests["collected"] == 0:
        found.append(f"gpu tests: none collected from {tests['paths']}")
    elif tests["failed"] or tests["errors"]:
        names = ", ".join(tests["failures"])
        found.append(f"gpu tests: {tests['failed']} failed, {tests['errors']} errors: {names}")
    elif gpu_visible and tests["skipped"] == tests["collected"]:
        reasons = "; ".join(tests["skip_reasons"])
        found.append(f"gpu tests: a GPU is visible but all {tests['collected']} skipped, none ran ({reasons})")
    return found


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def build_report(work: Path, tests_paths: str, bench_skipped: str | None) -> dict[str, Any]:
    """The check's JSON from ``work``: steps.jsonl (one record per step), env.json (``node_facts``),
    tests.xml (pytest's) and the benches' JSON; each step that is not ``ok`` carries the end of its log."""
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    for step in steps:
        log = work / f"{step['step']}.log"
        if step["status"] != "ok" and log.is_file():
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    env = read_json(work / "env.json") or {}
    gpus = env.get("gpus") or []
    status = next((s["status"] for s in steps if s["step"] == "gpu-tests"), "not run")
    tests = {"paths": tests_paths, "status": status} | (junit_outcome(work / "tests.xml") or {})
    if bench_skipped:
        bench: dict[str, Any] = {"skipped": bench_skipped}
    else:
        train = {"seed_cnn2@128": "bench_train_seed_cnn2.json", "resnet50@224": "bench_train_resnet50.json"}
        bench = {
            "train": {name: read_json(work / file) for name, file in train.items()},
            "data": read_json(work / "bench_data.json"),
        }
    gpu = None
    if gpus:
        first = gpus[0]
        gpu = {"name": first["name"], "count": len(gpus), "precision_auto": first["precision_auto"], "devices": gpus}
    failures = problems(steps, tests, bool(gpus))
    versions = {key: env.get(key) for key in ("host", "python", "torch", "cuda", "cudnn", "nccl", "driver")}
    return {
        "passed": not failures,
        "failures": failures,
        "gpu": gpu,
        **versions,
        "tests": tests,
        "bench": bench,
        "steps": steps,
        "seconds": sum(s["seconds"] for s in steps),
    }


def summary(report: dict[str, Any], out: Path) -> str:
    """What the check prints at its end: the GPU, the tests' counts, the benches' headline figures, the verdict."""
    gpu, tests, bench = report["gpu"], report["tests"], report["bench"]
    if not report["torch"]:
        seen = "unknown, the node was not probed"
    elif gpu:
        seen = f"{gpu['count']} x {gpu['name']}, precision auto -> {gpu['precision_auto']}"
    else:
        seen = "none visible"
    lines = ["== summary", f"GPU: {seen} | torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}"]
    if "collected" in tests:
        lines.append(
            f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped of {tests['collected']} collected from {tests['paths']}"
        )
        lines += [f"  skipped: {reason}" for reason in tests["skip_reasons"]]
    if "skipped" in bench:
        lines.append(f"benches: skipped ({bench['skipped']})")
    else:
        lines += bench_lines(bench)
    verdict = "FAILED:\n  " + "\n  ".join(report["failures"]) if report["failures"] else "all passed"
    lines.append(f"{verdict}\nwritten to {out} ({report['seconds']} s)")
    return "\n".join(lines)


def bench_lines(bench: dict[str, Any]) -> list[str]:
    """One line per bench (and one for each of the loader-fed and GPU-decoding figures it has)."""
    lines = []
    for name, figures in bench["train"].items():
        if not figures:
            lines.append(f"bench train {name}: no figures")
            continue
        best = max(figures["settings"].items(), key=lambda item: item[1])
        lines.append(
            f"bench train {name} batch {figures['batch_size']}: loop_overhead_ratio "
            f"{figures['loop_overhead_ratio']:.3f} (target >= 0.95), fastest {best[0]} {best[1]:.0f} img/s"
        )
        if fed := figures["loader_fed"]:
            lines.append(
                f"  fed by the loader ({fed['workers']} workers): {fed['img_per_s']:.0f} img/s, "
                f"{fed['vs_in_memory']:.2f} of in-memory {figures['reference_setting']}"
            )
    data = bench["data"]
    if not data:
        return [*lines, "bench data: no figures"]
    lines.append(
        f"bench data: pack {data['pack_img_per_s']:.1f} img/s (vs floor {data['pack_vs_floor']:.2f}), "
        f"load {data['load_img_per_s']:.0f} img/s (vs floor {data['load_vs_floor']:.2f}, "
        f"{data['load_vs_naive']:.0f}x naive) with {data['workers']} workers"
    )
    if data["load_gpu_decode_img_per_s"] is not None:
        lines.append(
            f"  decoding on the GPU: load {data['load_gpu_decode_img_per_s']:.0f} img/s, "
            f"nvJPEG alone {data['gpu_decode_floor_img_per_s']:.0f} img/s"
        )
    return lines


def probe(path: Path) -> int:
    """The probe step: ``node_facts()`` to ``path``, then ``aidetect doctor`` in this process (no second
    start of torch); its exit code."""
    from aidetect.doctor import doctor

    path.write_text(json.dumps(node_facts(), indent=1) + "\n")
    lines, passed = doctor()
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aidetect.bench.gpu_check", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe_command = commands.add_parser("probe", help="write node_facts() to a JSON file, then run doctor's checks")
    probe_command.add_argument("json")
    report = commands.add_parser("report", help="write the check's report; exit 1 when it failed")
    report.add_argument("work", type=Path, help="the script's scratch folder")
    report.add_argument("out", type=Path, help="the report's JSON file")
    report.add_argument("--tests", required=True, help="where the gpu tests were looked for")
    report.add_argument("--bench-skipped", default=None, help="why the benches were not run, if they were not")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(Path(args.json))
    result = build_report(args.work, args.tests, args.bench_skipped)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result, args.out))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
