"""Decisions that depend on the machine, as pure functions of what it reports: the numeric precision
(from the GPU's compute capability) and the device (from whether the job was given GPUs and whether
CUDA can use them). ``train``, ``evaluate``, ``doctor``, the benchmarks and the GPU tests all decide here,
so that what a V100 or a GPU job with a broken CUDA would do is tested on any machine.

Precision ``auto``: bf16 at compute capability >= 8.0 (A100, H100/H200), fp16 with a GradScaler below
(V100 7.0, T4 7.5), fp32 on the CPU. ``torch.cuda.is_bf16_supported()`` is not asked: by default it
also answers True where bf16 is only emulated (any sm_70 GPU on which a bf16 tensor can be made).

Device ``auto``: CUDA whenever the job was given GPUs (SLURM's GPU variables, a non-empty
``CUDA_VISIBLE_DEVICES``) or a GPU is usable; when GPUs were given and CUDA cannot use them, a
one-line ``UserError`` naming the cause instead of days of training on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aidetect.errors import UserError
from aidetect.preemption import OutOfMemory

if TYPE_CHECKING:  # torch is imported where it is used: the config module reads the choice lists above
    import torch

# cuBLAS is deterministic only with a fixed workspace (CUDA >= 10.2); it reads the setting when it makes its
# first handle, so the variable must be in the environment before a process's first CUDA matrix product.
DETERMINISTIC_CUBLAS = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")
BF16_CAPABILITY = (8, 0)  # the first GPUs with bf16 tensor cores (Ampere)
# Variables that say a process was given GPUs: SLURM's (set with --gpus*, --gres=gpu) and CUDA's own.
GPU_VARIABLES = (
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPUS",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "CUDA_VISIBLE_DEVICES",
)


def auto_precision(device_type: str, capability: tuple[int, int] | None) -> str:
    """``auto``'s choice for a device of type ``device_type`` (``cuda``/``cpu``) and compute capability."""
    if device_type != "cuda" or capability is None:
        return "fp32"
    return "bf16" if capability >= BF16_CAPABILITY else "fp16"


def choose_precision(precision: str, device_type: str, capability: tuple[int, int] | None, device_name: str) -> str:
    """The precision to train in: ``auto`` resolved, or the one asked for; ``UserError`` for bf16 on a GPU
    without bf16 tensor cores (it would run emulated, several times slower)."""
    if precision == "auto":
        return auto_precision(device_type, capability)
    if precision == "bf16" and device_type == "cuda" and capability is not None and capability < BF16_CAPABILITY:
        raise UserError(
            f"train.precision bf16: {device_name} (compute capability {capability[0]}.{capability[1]}) has no bf16 "
            "tensor cores and would emulate it; set train.precision fp16 (or auto)"
        )
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``choose_precision`` for a torch device, with its capability read from CUDA."""
    import torch

    if device.type != "cuda":
        return choose_precision(precision, device.type, None, str(device))
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    return choose_precision(precision, "cuda", capability, torch.cuda.get_device_name(index))


@dataclass(frozen=True)
class CudaFacts:
    """What this process can see of CUDA (``cuda_facts()``), the input of ``choose_device``."""

    given_gpus: str | None  # the variable that says the job was given GPUs (e.g. "SLURM_GPUS_ON_NODE=4"), if any
    torch_version: str
    torch_cuda: str | None  # the CUDA runtime torch was built with (torch.version.cuda); None: a CPU-only build
    driver_cuda: tuple[int, int] | None  # the newest CUDA the installed driver runs; None: no driver found
    available: bool  # torch.cuda.is_available()
    visible: str | None  # CUDA_VISIBLE_DEVICES as set (None: not set)


def given_gpus(environ: Mapping[str, str]) -> str | None:
    """``NAME=VALUE`` of the first variable saying this process was given GPUs, None when none says so.
    An empty ``CUDA_VISIBLE_DEVICES`` (or -1) hides every GPU on purpose: not a sign."""
    for name in GPU_VARIABLES:
        value = environ.get(name, "").strip()
        none = ("", "-1", "NoDevFiles") if name == "CUDA_VISIBLE_DEVICES" else ("", "0")
        if value not in none:
            return f"{name}={value}"
    return None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver supports (cuDriverGetVersion), without initialising CUDA."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if library.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


def cuda_facts(environ: Mapping[str, str] | None = None) -> CudaFacts:
    import torch

    environ = os.environ if environ is None else environ
    return CudaFacts(
        given_gpus=given_gpus(environ),
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver_cuda=driver_cuda_version(),
        available=torch.cuda.is_available(),
        visible=environ.get("CUDA_VISIBLE_DEVICES"),
    )


def cuda_problem(facts: CudaFacts) -> str:
    """Why CUDA is unusable here, as the one line that says what to do."""
    if facts.torch_cuda is None:
        return f"torch {facts.torch_version} is a CPU-only build; install a CUDA build: bash hpc/setup_env.sh"
    if facts.driver_cuda is None:
        return (
            f"no NVIDIA driver found (libcuda.so.1) for torch {facts.torch_version} (CUDA {facts.torch_cuda}): "
            "is this a GPU node?"
        )
    runtime = tuple(int(part) for part in facts.torch_cuda.split(".")[:2])
    if runtime > facts.driver_cuda:
        driver = ".".join(map(str, facts.driver_cuda))
        return (
            f"torch {facts.torch_version} needs CUDA {facts.torch_cuda}, the driver runs CUDA {driver} at most: "
            "install a torch build for this driver (bash hpc/setup_env.sh --gpu-arch ...) or load a newer driver"
        )
    return f"CUDA sees no GPU (CUDA_VISIBLE_DEVICES={facts.visible!r}); check the job's GPU request"


def choose_device(requested: str, facts: CudaFacts) -> str:
    """``cuda`` or ``cpu`` for ``train.device`` ``requested``; ``UserError`` naming the cause when CUDA is
    asked for, or the job was given GPUs, and CUDA cannot run here."""
    if requested == "cpu":
        return "cpu"
    if facts.available:
        return "cuda"
    if requested == "cuda":
        raise UserError(f"train.device cuda: {cuda_problem(facts)}")
    if facts.given_gpus:
        raise UserError(
            f"this job was given GPUs ({facts.given_gpus}) but CUDA cannot use them: {cuda_problem(facts)}; "
            "set train.device cpu to train on the CPU anyway"
        )
    return "cpu"


def set_cuda_environment(deterministic: bool) -> None:
    """Put into this process's environment what CUDA libraries read once, at their first use: call where a
    command starts, before any CUDA work. ``train.deterministic`` needs cuBLAS's fixed workspace
    (``DETERMINISTIC_CUBLAS``); a value the user set is kept."""
    if deterministic:
        os.environ.setdefault(*DETERMINISTIC_CUBLAS)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: CUDA's out of memory, or the CPU allocator's."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


@contextlib.contextmanager
def memory_named(batch_size: int, device: torch.device) -> Iterator[None]:
    """Runs the block; running out of memory becomes ``OutOfMemory`` (exit 5, never requeued: the same batch
    fails again) with one line naming the per-process batch size."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        where = "GPU" if device.type == "cuda" else "process"
        raise OutOfMemory(
            f"{device} ran out of memory at data.batch_size {batch_size} per {where}: lower data.batch_size "
            "(optim.accumulate keeps the global batch) or crop smaller"
        ) from None
