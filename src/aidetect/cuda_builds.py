"""Which PyTorch build has CUDA kernels for which NVIDIA GPU, and what to install instead.

A CUDA build of PyTorch carries machine code (``sm_XY``) for a list of GPU architectures and, at
times, PTX (``compute_XY``) that the driver compiles for newer ones. Machine code for ``sm_XY`` runs on
GPUs of compute capability X.Y and X.Z with Z >= Y (same major); PTX for ``compute_XY`` on any
capability >= X.Y. PyTorch 2.14's default wheels (PyPI, CUDA 13.0) start at sm_75: a V100 (sm_70, SDSC
Expanse) fails at its first kernel with "no kernel image is available for execution on the device".
Its CUDA 12.6 build (the "legacy" one) is the only one with Volta.

This module needs nothing but the standard library at import time: ``hpc/setup_env.sh`` runs it with
the system Python, before PyTorch is installed, to choose the wheel (``python3 cuda_builds.py sm_70``).
The versions it installs are the newest that aidetect's requirements (``pyproject.toml``) allow.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # there in a source checkout only
WHEEL_INDEX = "https://download.pytorch.org/whl"
# PyTorch 2.14's CUDA wheel variants, newest first, with the oldest GPU architecture each has kernels for.
WHEEL_VARIANTS = (("cu130", (7, 5)), ("cu126", (5, 0)))
DEFAULT_VARIANT = "cu130"  # what a plain `pip install torch` brings from PyPI


def requirements() -> list[str]:
    """aidetect's dependencies as requirement strings (``torch<=2.14.1,>=2.2``): from ``pyproject.toml`` in a
    source checkout (``hpc/setup_env.sh`` runs this file before anything is installed), else from the
    installed package's metadata; empty when neither exists."""
    if PYPROJECT.is_file():
        block = re.search(r"^dependencies = \[(.*?)^\]", PYPROJECT.read_text(), re.MULTILINE | re.DOTALL)
        if block:
            return re.findall(r'"([^"]+)"', block.group(1))
    try:
        return importlib.metadata.requires("aidetect") or []
    except importlib.metadata.PackageNotFoundError:
        return []


def pinned(name: str) -> str:
    """The newest version of package ``name`` that aidetect allows: its requirement's ``<=`` or ``==`` bound.
    ``ValueError`` when there is no such requirement."""
    for requirement in requirements():
        match = re.match(r"([A-Za-z0-9._-]+)\s*([^;]*)", requirement)
        if match and match.group(1) == name:
            bounds = [spec.strip() for spec in match.group(2).split(",")]
            newest = [spec[2:].strip() for spec in bounds if spec.startswith(("<=", "=="))]
            if newest:
                return newest[0]
    raise ValueError(f"aidetect's requirements pin no newest {name} version (<= or ==); see pyproject.toml")


def parse_arch(text: str) -> tuple[int, int]:
    """``sm_70`` / ``compute_70`` / ``7.0`` / ``70`` -> (7, 0); ``sm_120`` -> (12, 0)."""
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)", text.strip().lower())
    if not match:
        raise ValueError(f"not a GPU architecture: {text!r} (expected e.g. sm_70 or 7.0)")
    return int(match.group(1)), int(match.group(2))


def arch_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def has_kernels(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build compiled for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on this GPU."""
    for arch in arch_list:
        built = parse_arch(arch)
        if arch.startswith("compute_") and built <= capability:
            return True  # PTX: the driver compiles it for this (newer) GPU
        if not arch.startswith("compute_") and built[0] == capability[0] and built[1] <= capability[1]:
            return True
    return False


def wheel_variant(capability: tuple[int, int]) -> str:
    """The newest PyTorch wheel variant with kernels for this GPU."""
    for variant, oldest in WHEEL_VARIANTS:
        if capability >= oldest:
            return variant
    raise ValueError(f"no PyTorch {pinned('torch')} build supports {arch_name(capability)}")


def install_command(capability: tuple[int, int]) -> str:
    variant = wheel_variant(capability)
    index = "" if variant == DEFAULT_VARIANT else f" --index-url {WHEEL_INDEX}/{variant}"
    return f"pip install {' '.join(wheel_requirements())}{index}"


def wheel_requirements() -> list[str]:
    """``torch==X torchvision==Y``: the versions a CUDA build is installed at, the newest aidetect allows."""
    return [f"{name}=={pinned(name)}" for name in ("torch", "torchvision")]


def build_problem(device: str, capability: tuple[int, int], arch_list: Sequence[str], torch_version: str) -> str | None:
    """None when the installed build runs on this GPU, else one line that says what to install."""
    if has_kernels(capability, arch_list):
        return None
    return (
        f"{device} ({arch_name(capability)}) has no kernels in torch {torch_version} (built for "
        f"{' '.join(arch_list) or 'no GPU'}); reinstall with 'bash hpc/setup_env.sh --gpu-arch "
        f"{arch_name(capability)}', i.e. {install_command(capability)}"
    )


def check_visible_gpus() -> list[str]:
    """One line per visible GPU that the installed PyTorch cannot run on (empty: all fine or no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    problems = []
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        problem = build_problem(
            torch.cuda.get_device_name(index), capability, torch.cuda.get_arch_list(), torch.__version__
        )
        if problem:
            problems.append(problem)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 cuda_builds.py ARCH`` prints ``VARIANT TORCH_REQUIREMENT TORCHVISION_REQUIREMENT INDEX``
    (INDEX is ``-`` for the default wheels on PyPI), e.g. ``cu126 torch==X torchvision==Y URL``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python3 cuda_builds.py ARCH   (e.g. sm_70 or 7.0)", file=sys.stderr)
        return 2
    try:
        variant = wheel_variant(parse_arch(args[0]))
        wheels = wheel_requirements()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index = "-" if variant == DEFAULT_VARIANT else f"{WHEEL_INDEX}/{variant}"
    print(variant, *wheels, index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
