"""The GPU paths, in real processes as a user starts them: one GPU and two with nccl, fp16 + GradScaler,
bf16, channels_last, torch.compile, ``--resume auto`` after a SIGKILL, evaluation on the GPU against the
CPU, and JPEG decoding on the GPU against the workers'. Marked ``gpu`` and skipped where no CUDA GPU is
visible, each with its reason (``pytest -rs`` lists them); ``bash hpc/gpu_check.sh`` runs them on a GPU
node together with the benches. This module imports neither submitit nor wandb, directly or through
aidetect: GPU images without them run it.

Not marked ``gpu``: torch.compile on the CPU, and the tests of that script and of its verdict.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.commands import run_cli, torchrun
from helpers.training import AUGMENTED, kill_and_resume, train_args, weights

from aidetect.bench.gpu_check import problems
from aidetect.checkpoint import load_checkpoint
from aidetect.data.loader import build_loader
from aidetect.hardware import auto_precision
from aidetect.metrics import METRIC_KEYS

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS == 0, reason="gpu test: no CUDA GPU visible (torch.cuda.is_available() is False)")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"gpu test: nccl with 2 processes needs >= 2 GPUs, {GPUS} visible")

# cuDNN runs fp32 convolutions in TF32 by default on Ampere and later (10 mantissa bits): a GPU fp32 run
# then differs from a CPU one by ~1e-3. Where a test compares numbers across devices or process counts it
# turns TF32 off with cuBLAS/cuDNN's own switch, so that fp32 means fp32 and tolerances can be tight.
STRICT_FP32 = {"NVIDIA_TF32_OVERRIDE": "0"}


@pytest.fixture(scope="module")
def gpu_run(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One process on one GPU, fp32, 2 epochs: (the run folder, its output), read by several tests."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "2", "--batch-size", "8"), env=os.environ | STRICT_FP32)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


@pytest.mark.gpu
@needs_gpu
def test_one_process_trains_on_the_gpu(gpu_run: tuple[Path, str]) -> None:
    out, stdout = gpu_run
    assert "on 1 process(es), cuda, fp32" in stdout
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["samples"] > 0 and math.isfinite(metrics["loss"])
    assert finite(weights(out))


@pytest.mark.gpu
@needs_two_gpus
@needs_gpu  # evaluated first: without a GPU, that is the reason given
def test_two_processes_with_nccl_train_like_one_with_the_same_global_batch(
    tiny_pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in STRICT_FP32.items():
        monkeypatch.setenv(key, value)  # torchrun's environment is this process's
    args = ["--set", "train.deterministic=true", *AUGMENTED]
    one = run_cli(*train_args(tiny_pack, tmp_path / "one", *args, "--batch-size", "8"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*train_args(tiny_pack, tmp_path / "two", *args, "--batch-size", "4"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert "on 2 process(es), cuda" in two.stdout  # a GPU per rank: the nccl backend
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    # Not bit-identical even so: each rank convolves 4 images where one process convolves 8 (other cuDNN
    # kernels) and the gradients are summed in another order by the all-reduce.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)
    one_metrics = json.loads((tmp_path / "one" / "test_metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "test_metrics.json").read_text())
    assert one_metrics["samples"] == two_metrics["samples"] > 0
    assert one_metrics["auroc"] == pytest.approx(two_metrics["auroc"], abs=1e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("precision", "channels_last"),
    [("fp16", False), ("bf16", False), ("fp32", True)],
    ids=["fp16-gradscaler", "bf16", "fp32-channels_last"],
)
def test_precisions_and_channels_last_train_on_the_gpu(
    tiny_pack: Path, tmp_path: Path, precision: str, channels_last: bool
) -> None:
    if precision == "bf16" and auto_precision("cuda", torch.cuda.get_device_capability()) != "bf16":
        pytest.skip(f"gpu test: {torch.cuda.get_device_name()} has no bf16 tensor cores (auto picks fp16 there)")
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--precision", precision, "--model", "seed_cnn2", "--batch-size", "8"]
    result = run_cli(*train_args(tiny_pack, out, *extra, "--set", f"model.channels_last={str(channels_last).lower()}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cuda, {precision}" in result.stdout
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(METRIC_KEYS) <= metrics.keys() and math.isfinite(metrics["loss"])
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint.config.model.channels_last is channels_last
    assert finite(checkpoint.model)  # fp16 overflow would have been skipped by the scaler, never stored
    scaler = checkpoint.scaler
    assert bool(scaler) == (precision == "fp16")  # GradScaler only for fp16
    if scaler:
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu]), "cpu"])
def test_torch_compile_trains_through_the_compiled_model(tiny_pack: Path, tmp_path: Path, device: str) -> None:
    """torch's own log shows dynamo tracing the model's forward and inductor compiling it: the training
    steps ran through the compiled module (evaluation runs the plain one, so nothing else calls it). On the
    CPU inductor compiles C++ with the system's compiler: a minute the first time, cached after."""
    out = tmp_path / "compiled"
    args = train_args(tiny_pack, out, "--epochs", "1", "--batch-size", "8", "--set", "model.compile=true")
    result = run_cli(*args, "--set", f"train.device={device}", env=os.environ | {"TORCH_LOGS": "dynamo"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{device}, fp32" in result.stdout
    assert "torchdynamo start tracing forward" in result.stderr, result.stderr[-2000:]
    assert "done compiler function inductor" in result.stderr
    state = load_checkpoint(out / "last.pt").model
    assert not any(key.startswith("_orig_mod") for key in state) and finite(state)  # plain weights


@pytest.mark.gpu
@needs_gpu
def test_killed_gpu_run_resumes_to_bit_identical_weights(tiny_pack: Path, tmp_path: Path) -> None:
    # seed_cnn1 (conv, ReLU, max-pool, linear) has deterministic CUDA kernels for everything it runs, so
    # train.deterministic makes the GPU run exactly repeatable and a resumed run bit-identical. (seed_cnn2
    # could not run deterministic on CUDA: its bilinear upsampling has no deterministic backward.)
    args = ["--batch-size", "8", "--set", "train.deterministic=true", *AUGMENTED]
    reference, differing = kill_and_resume(tiny_pack, tmp_path, args)
    assert "cuda, fp32" in reference.stdout
    assert differing == []


@pytest.mark.gpu
@needs_gpu
def test_evaluation_on_the_gpu_agrees_with_the_cpu(gpu_run: tuple[Path, str], tiny_pack: Path, tmp_path: Path) -> None:
    checkpoint = gpu_run[0] / "best.pt"  # trained with --precision fp32: both evaluate in fp32

    def evaluate(out: Path, env: dict[str, str]) -> dict:
        result = run_cli("evaluate", str(checkpoint), "--data", str(tiny_pack), "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((out / "eval_test.json").read_text())

    cpu = evaluate(tmp_path / "cpu", os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    gpu = evaluate(tmp_path / "gpu", os.environ | STRICT_FP32)
    assert cpu["samples"] == gpu["samples"] > 0
    for key in METRIC_KEYS:  # counts and threshold metrics equal; loss, AUROC and AP to float rounding
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-5, abs=1e-6), key
    sources = cpu["per_source"]["sources"]
    assert {s: (e["n"], pytest.approx(e["accuracy"], abs=1e-6)) for s, e in sources.items()} == {
        s: (e["n"], e["accuracy"]) for s, e in gpu["per_source"]["sources"].items()
    }


@pytest.mark.gpu
@needs_gpu
def test_gpu_decoding_agrees_with_the_workers_and_trains(tiny_pack: Path, tmp_path: Path) -> None:
    """nvJPEG's inverse DCT and colour conversion are not libjpeg-turbo's, so pixels agree to about a level;
    the crops and flips are the same windows (a wrong window or flip would differ by tens of levels)."""

    def epoch(decode_on_device: bool) -> tuple[list[str], torch.Tensor]:
        loader = build_loader(
            tiny_pack, ["fold1"], batch_size=4, train=True, crop=24, device="cuda", decode_on_device=decode_on_device
        )
        loader.set_epoch(1)
        batches = [(keys, images.cuda()) for images, _, keys, _ in loader.uint8_batches()]  # copies
        return [key for keys, _ in batches for key in keys], torch.cat([images for _, images in batches])

    (keys, cpu), (gpu_keys, gpu) = epoch(False), epoch(True)
    assert gpu_keys == keys and gpu.device.type == "cuda"
    difference = (gpu.float() - cpu.float()).abs()
    print(f"GPU vs CPU decoding: mean {difference.mean():.3f}, max {difference.max():.0f} levels")
    assert difference.mean() < 1.5
    result = run_cli(*train_args(tiny_pack, tmp_path / "run", "--epochs", "1", "--set", "data.decode=gpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cuda" in result.stdout and finite(weights(tmp_path / "run"))


def gpu_check(out: Path, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """``hpc/gpu_check.sh OUT`` with CUDA hidden and ``settings`` in its environment, from ``tmp_path``."""
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)} | settings
    return subprocess.run(
        ["bash", str(repo / "hpc" / "gpu_check.sh"), str(out)],
        cwd=tmp_path,  # the script finds the repository itself; a relative JSON path is the caller's
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture
def without_submitit_and_wandb(tmp_path: Path) -> str:
    """A PYTHONPATH under which ``import submitit`` and ``import wandb`` fail as if neither were installed."""
    for name in ("submitit", "wandb"):
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(f'raise ImportError("No module named {name!r}")\n')
    path = os.pathsep.join(filter(None, [str(tmp_path / "absent"), os.environ.get("PYTHONPATH")]))
    for name in ("submitit", "wandb"):
        env = os.environ | {"PYTHONPATH": path}
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert probe.stderr.rstrip().endswith(f"ImportError: No module named '{name}'"), probe.stderr
    return path


def test_gpu_check_script_without_a_gpu_lists_the_gpu_tests_as_skipped(
    tmp_path: Path, without_submitit_and_wandb: str
) -> None:
    """``hpc/gpu_check.sh`` with CUDA hidden, its default test path and neither submitit nor wandb
    importable (as on a GPU image without them): exit 0, JSON with ``gpu`` null and every gpu test skipped."""
    out = tmp_path / "gpu_check.json"
    result = gpu_check(out, tmp_path, PYTHONPATH=without_submitit_and_wandb)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no GPU visible" in result.stdout
    report = json.loads(out.read_text())
    tests = report["tests"]
    assert report["passed"] and report["failures"] == []
    assert report["gpu"] is None and report["bench"] == {"skipped": "no GPU visible"}
    assert tests["skipped"] == tests["collected"] >= 9 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert all("no CUDA GPU visible" in reason for reason in tests["skip_reasons"])
    assert "SKIPPED" in result.stdout and "gpu test: no CUDA GPU visible" in result.stdout  # as pytest -rs lists


def test_gpu_check_script_fails_saying_why_when_out_of_time(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    result = gpu_check(out, tmp_path, GPU_CHECK_BUDGET_S="10")  # under the 20 s a step needs to start
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [
        "probe: not run, out of time (10 s of GPU_CHECK_BUDGET_S left)",
        "gpu-tests: not run, out of time (10 s of GPU_CHECK_BUDGET_S left)",
    ]
    assert not report["passed"] and "FAILED:" in result.stdout and "unknown, the node was not probed" in result.stdout


def step(name: str, status: str = "ok", exit_code: int = 0) -> dict:
    return {"step": name, "status": status, "seconds": 1, "exit_code": exit_code, "limit_s": 90}


def outcome(passed: int = 0, failed: int = 0, skipped: int = 0) -> dict:
    """The gpu tests' part of the report, as the script and ``junit_outcome`` make it."""
    return {
        "paths": "tests/test_gpu.py",
        "status": "failed" if failed else "ok",
        "collected": passed + failed + skipped,
        "passed": passed,
        "failed": failed,
        "errors": 0,
        "skipped": skipped,
        "skip_reasons": ["gpu test: no CUDA GPU visible"] if skipped else [],
        "failures": [f"tests/test_gpu.py::test_{i}" for i in range(failed)],
    }


@pytest.mark.parametrize(
    ("gpu_visible", "steps", "tests", "expected"),
    [
        (False, [step("gpu-tests")], outcome(skipped=9), []),
        (True, [step("gpu-tests"), step("bench-data")], outcome(passed=8, skipped=1), []),
        (True, [step("gpu-tests")], outcome(skipped=9), ["gpu tests: a GPU is visible but all 9 skipped, none ran"]),
        (True, [step("gpu-tests", "failed", 5)], outcome(), ["gpu-tests: failed (exit 5", "gpu tests: none collected"]),
        (True, [step("gpu-tests", "failed", 1)], outcome(passed=7, failed=1), ["gpu-tests: failed", "gpu tests: 1"]),
        (True, [step("gpu-tests"), step("bench-data", "timeout", 124)], outcome(passed=8), ["bench-data: cut at"]),
        (True, [step("gpu-tests"), step("bench-data", "out of time", -1)], outcome(passed=8), ["bench-data: not run"]),
    ],
    ids=["no-gpu-all-skipped", "gpu-ran", "gpu-all-skipped", "none-collected", "a-test-failed", "cut", "out-of-time"],
)
def test_gpu_check_verdict_fails_a_check_that_tested_nothing_or_ran_out_of_time(
    gpu_visible: bool, steps: list[dict], tests: dict, expected: list[str]
) -> None:
    found = problems(steps, tests, gpu_visible)
    assert len(found) == len(expected) and all(map(str.startswith, found, expected)), found
