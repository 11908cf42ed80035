"""Faults a cluster delivers that must not pass silently, tested on this CPU machine: the precision and the
device a GPU node would get (pure functions of what it reports), a GPU job without a usable CUDA, a stop
during validation, a resume on another number of processes, running out of memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.commands import run_cli, signal_group_at, torchrun_command
from helpers.training import train_args, weights

from aidetect.checkpoint import load_checkpoint
from aidetect.data.pack import PackSettings, pack
from aidetect.data.synth import synth
from aidetect.distributed import is_peer_failure
from aidetect.errors import UserError
from aidetect.hardware import CudaFacts, auto_precision, choose_device, choose_precision, memory_named
from aidetect.preemption import OUT_OF_MEMORY_EXIT_CODE, OutOfMemory


@pytest.mark.parametrize(
    ("device", "capability", "precision"),
    [
        ("cuda", (7, 0), "fp16"),  # V100 (SDSC Expanse): no bf16 tensor cores, fp16 with a GradScaler
        ("cuda", (7, 5), "fp16"),  # T4
        ("cuda", (8, 0), "bf16"),  # A100
        ("cuda", (9, 0), "bf16"),  # H100, H200
        ("cpu", None, "fp32"),
    ],
)
def test_auto_precision_follows_compute_capability(device: str, capability: tuple | None, precision: str) -> None:
    assert auto_precision(device, capability) == precision
    assert choose_precision("auto", device, capability, "gpu") == precision


def test_bf16_asked_for_on_a_v100_is_one_line() -> None:
    with pytest.raises(UserError, match=r"Tesla V100-SXM2-32GB \(compute capability 7.0\).*set train.precision fp16"):
        choose_precision("bf16", "cuda", (7, 0), "Tesla V100-SXM2-32GB")
    assert choose_precision("bf16", "cuda", (8, 0), "A100") == "bf16"


def facts(**changes: object) -> CudaFacts:
    usable = {
        "given_gpus": "SLURM_GPUS_ON_NODE=4",
        "torch_version": "2.14.1+cu126",
        "torch_cuda": "12.6",
        "driver_cuda": (12, 8),
        "available": True,
        "visible": "0,1,2,3",
    }
    return CudaFacts(**(usable | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"torch_cuda": None, "torch_version": "2.14.1+cpu"}, "torch 2.14.1+cpu is a CPU-only build"),
        ({"driver_cuda": None}, "no NVIDIA driver found"),
        ({"driver_cuda": (12, 2)}, "needs CUDA 12.6, the driver runs CUDA 12.2 at most"),
        ({"visible": ""}, "CUDA sees no GPU (CUDA_VISIBLE_DEVICES='')"),
    ],
)
def test_a_gpu_job_whose_cuda_cannot_run_names_the_cause(changes: dict, cause: str) -> None:
    broken = facts(available=False, **changes)
    with pytest.raises(UserError, match=r"given GPUs \(SLURM_GPUS_ON_NODE=4\)") as raised:
        choose_device("auto", broken)
    assert cause in str(raised.value)
    with pytest.raises(UserError, match=r"train\.device cuda"):
        choose_device("cuda", facts(available=False, given_gpus=None, **changes))
    assert choose_device("cpu", broken) == "cpu"  # asked for: the user knows
    assert choose_device("auto", facts(available=False, given_gpus=None, **changes)) == "cpu"  # a laptop
    assert choose_device("auto", facts()) == "cuda"


def test_train_evaluate_and_doctor_given_gpus_on_this_cpu_machine_stop_at_once(tiny_pack: Path, tmp_path: Path) -> None:
    env = os.environ | {"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
    out = tmp_path / "run"
    trained = run_cli(*train_args(tiny_pack, out, "--epochs", "1"), env=env)
    assert trained.returncode == 2 and len(trained.stderr.strip().splitlines()) == 1, trained.stderr[-2000:]
    assert "was given GPUs (SLURM_GPUS_ON_NODE=1) but CUDA cannot use them" in trained.stderr
    assert not (out / "last.pt").exists()
    doctor = run_cli("doctor", env=env)
    assert doctor.returncode == 1 and "FAIL gpus: this job was given GPUs" in doctor.stdout
    on_cpu = run_cli(*train_args(tiny_pack, out, "--epochs", "1", "--set", "train.device=cpu"), env=env)
    assert on_cpu.returncode == 0, on_cpu.stderr[-2000:]  # asked for the CPU: trains there
    evaluated = run_cli("evaluate", str(out / "best.pt"), "--data", str(tiny_pack), env=env)
    assert evaluated.returncode == 2 and "CUDA cannot use them" in evaluated.stderr


@pytest.fixture(scope="module")
def long_validation_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds: validation is as long as an epoch's training, so a signal can land in it."""
    root = tmp_path_factory.mktemp("longval")
    synth(root / "raw", n=240, seed=7, workers=2, min_side=64, max_side=96)
    settings = PackSettings(mode="crop", size=32, shard_size=40, folds=2)
    pack(root / "raw", root / "shards", settings, workers=2, progress=False)
    return root / "shards"


def history(run: Path) -> list[dict]:
    """metrics.jsonl without the timing (images per second)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in rows]


def test_a_group_sigterm_during_validation_saves_the_trained_epoch_and_resume_ends_bit_identical(
    long_validation_pack: Path, tmp_path: Path
) -> None:
    args = ["--epochs", "2", "--batch-size", "2", "--set", "train.deterministic=true"]
    reference = run_cli(*train_args(long_validation_pack, tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "aidetect.cli", *train_args(long_validation_pack, out, *args)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in process.stdout:
        if "epoch 1: validating" in line:  # SLURM's SIGTERM to the group, the trainer frozen so that it lands
            # in validation. Only the trainer: a SIGSTOP to the group can stop a worker it forks meanwhile for good.
            os.kill(process.pid, signal.SIGSTOP)
            os.killpg(process.pid, signal.SIGTERM)
            os.kill(process.pid, signal.SIGCONT)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr and "validation pending" in stdout
    state = load_checkpoint(out / "last.pt").state
    assert state.epoch == 0 and state.pending is not None and state.history == []
    resumed = run_cli(*train_args(long_validation_pack, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(epoch trained, validation pending)" in resumed.stdout
    assert "epoch 1 batch" not in resumed.stdout  # the trained epoch is not trained again
    a, b = weights(tmp_path / "reference"), weights(out)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert history(out) == history(tmp_path / "reference")


def test_resume_on_another_number_of_processes_needs_the_same_global_batch(tiny_pack: Path, tmp_path: Path) -> None:
    args = ["--epochs", "2", "--set", "train.deterministic=true", "--set", "data.workers=1"]
    reference = run_cli(*train_args(tiny_pack, tmp_path / "reference", *args, "--batch-size", "8"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "two-then-one"
    command = torchrun_command("-m", "aidetect.cli", *train_args(tiny_pack, out, *args, "--batch-size", "4"))
    stopped = signal_group_at(command, "epoch 2 batch 2/", signal.SIGTERM, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert stopped.stderr.count("aidetect: stopped by a signal") == 2, stopped.stderr[-3000:]
    position = load_checkpoint(out / "last.pt").state
    other = run_cli(*train_args(tiny_pack, out, *args, "--batch-size", "4", "--resume", "auto"))
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "saved by 2 process(es) x data.batch_size 4" in other.stderr and "data.batch_size 8" in other.stderr
    resumed = run_cli(*train_args(tiny_pack, out, *args, "--batch-size", "8", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed on 1 process(es) a run saved by 2" in resumed.stdout
    assert f"epoch 2 batch {position.batch + 1}/" in resumed.stdout  # on from the saved global batch
    a, b = weights(tmp_path / "reference"), weights(out)
    for key in a:  # the same samples in the same global batches: rounding apart, the same weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)


def test_running_out_of_memory_is_one_line_naming_the_batch_size() -> None:
    cpu = torch.device("cpu")
    with (
        pytest.raises(OutOfMemory, match=r"ran out of memory at data\.batch_size 16 per process"),
        memory_named(16, cpu),
    ):
        torch.empty(2**50, dtype=torch.uint8)  # a real allocation that the allocator refuses
    assert OutOfMemory.exit_code == OUT_OF_MEMORY_EXIT_CODE
    with pytest.raises(ValueError), memory_named(16, cpu):  # anything else passes through
        raise ValueError("not memory")


@pytest.mark.parametrize(
    ("message", "lost"),
    [  # what gloo said on the test cluster when a peer was SIGSTOPped or killed
        ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv", True),
        ("Application timeout caused pair closure", True),  # from DDP's all-reduce in autograd's thread
        ("[../gloo/transport/tcp/pair.cc:545] Read error [10.213.7.12]:23425: Connection reset by peer", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x10 and 12x1)", False),  # a bug stays a crash
    ],
)
def test_a_failed_collective_is_told_from_a_bug(message: str, lost: bool) -> None:
    assert is_peer_failure(RuntimeError(message)) is lost
