"""Which PyTorch build runs on which GPU: a pure function of compute capability and the build's arch list."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aidetect.cuda_builds import build_problem, has_kernels, install_command, parse_arch, wheel_variant

# torch.cuda.get_arch_list() of PyTorch 2.14.1's wheels: PyPI's default (CUDA 13.0) and the CUDA 12.6 one.
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
MODULE = Path(__file__).resolve().parents[1] / "src" / "aidetect" / "cuda_builds.py"


@pytest.mark.parametrize(
    ("gpu", "capability", "arch_list", "runs"),
    [
        ("V100 (Expanse)", (7, 0), CU130, False),
        ("V100 (Expanse)", (7, 0), CU126, True),
        ("T4", (7, 5), CU130, True),
        ("A100", (8, 0), CU130, True),
        ("A10 (sm_86 code for 8.6)", (8, 6), ["sm_80"], True),  # same major, newer minor: binary compatible
        ("H100", (9, 0), CU130, True),
        ("H100 on an sm_80-only build", (9, 0), ["sm_80"], False),  # machine code does not cross majors
        ("H100 with PTX", (9, 0), ["sm_80", "compute_80"], True),  # the driver compiles PTX forward
        ("V100 with newer PTX only", (7, 0), ["compute_80"], False),
        ("B200", (10, 0), CU126, False),
    ],
)
def test_has_kernels(gpu: str, capability: tuple[int, int], arch_list: list[str], runs: bool) -> None:
    assert has_kernels(capability, arch_list) is runs, gpu


def test_a_v100_under_the_default_build_gets_one_line_naming_the_build_to_install() -> None:
    problem = build_problem("Tesla V100-SXM2-32GB", (7, 0), CU130, "2.14.1+cu130")
    assert problem is not None and "\n" not in problem
    assert "sm_70" in problem and "setup_env.sh --gpu-arch sm_70" in problem and "whl/cu126" in problem
    assert build_problem("NVIDIA H100 80GB HBM3", (9, 0), CU130, "2.14.1+cu130") is None


def test_wheel_choice() -> None:
    assert wheel_variant((7, 0)) == "cu126" and wheel_variant((9, 0)) == "cu130"
    assert "--index-url" not in install_command((8, 0))  # PyPI's default wheels suffice
    assert parse_arch("sm_120") == (12, 0) and parse_arch("7.0") == (7, 0) and parse_arch("compute_86") == (8, 6)
    with pytest.raises(ValueError, match="not a GPU architecture"):
        parse_arch("volta")


def test_setup_env_can_ask_before_torch_is_installed() -> None:
    """hpc/setup_env.sh runs the module with the system Python, where no torch need exist."""
    python = shutil.which("python3")
    result = subprocess.run([python, "-I", str(MODULE), "sm_70"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    variant, torch_req, vision_req, index = result.stdout.split()
    assert vision_req.startswith("torchvision==")
    assert (variant, index) == ("cu126", "https://download.pytorch.org/whl/cu126") and torch_req.startswith("torch==")
    assert subprocess.run([python, "-I", str(MODULE), "8.0"], capture_output=True, text=True).stdout.split()[3] == "-"
