"""Pack's workers each may hold one image decoded at --max-pixels: as many run as the job's memory holds."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers.commands import run_cli
from PIL import Image

from aidetect.data.pack import (
    BYTES_PER_PIXEL,
    PackSettings,
    affordable_workers,
    decode_and_preprocess,
    pixels_fitting,
    worker_bytes,
)
from aidetect.data.synth import synth
from aidetect.errors import UserError
from aidetect.jobmemory import cgroup_memory, job_memory, own_resident_bytes

GB = 2**30


@pytest.mark.parametrize(
    ("workers", "max_pixels", "memory", "expected"),
    [
        (16, 250_000_000, 64 * GB, 16),  # room for all
        (16, 250_000_000, 32 * GB, 9),  # 3.6 GB each
        (16, 25_000_000, 32 * GB, 16),  # a tenth of the budget: all again
        (4, 250_000_000, 2 * worker_bytes(250_000_000), 2),  # exactly two
        (4, 250_000_000, 2 * worker_bytes(250_000_000) - 1, 1),
        (4, 250_000_000, 3 * GB, 0),  # not even one
    ],
)
def test_workers_are_as_many_as_the_memory_holds(workers: int, max_pixels: int, memory: int, expected: int) -> None:
    assert affordable_workers(workers, max_pixels, memory) == expected


@pytest.mark.parametrize("memory", [3 * GB, 10 * GB + 12345, 100 * GB])
def test_the_suggested_budget_is_the_largest_that_fits(memory: int) -> None:
    budget = pixels_fitting(8, memory)
    assert affordable_workers(8, budget, memory) == 8 and affordable_workers(8, budget + 1, memory) == 7


def test_the_job_memory_is_slurms_else_the_cgroups_never_more_than_the_machines(tmp_path: Path) -> None:
    allocated = own_resident_bytes() // 2**20 + 1000  # MB: this process (a long test session: GBs) and more
    per_node = job_memory({"SLURM_MEM_PER_NODE": str(allocated)}, tmp_path)
    assert per_node.source.startswith(f"SLURM_MEM_PER_NODE={allocated} MB, less this process's ")
    assert 0 < per_node.bytes < allocated * 2**20  # what this process holds is taken off
    per_cpu = job_memory({"SLURM_MEM_PER_CPU": "500", "SLURM_CPUS_ON_NODE": "3"}, tmp_path)
    assert per_cpu.source.startswith("SLURM_MEM_PER_CPU=500 MB x SLURM_CPUS_ON_NODE=3") and per_cpu.bytes < 1500 * 2**20
    with pytest.raises(UserError, match=r"SLURM_MEM_PER_NODE='4G': not a whole number"):
        job_memory({"SLURM_MEM_PER_NODE": "4G"}, tmp_path)

    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2: no limit
    assert cgroup_memory(tmp_path) is None
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    assert cgroup_memory(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{GB}\n")
    assert job_memory({}, tmp_path).source.startswith(f"the cgroup limit in {tmp_path / 'memory.max'}, less ")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{GB // 2}\n")  # the tighter one counts
    assert cgroup_memory(tmp_path).bytes == GB // 2
    (tmp_path / "memory.max").write_text(f"{1 << 50}\n")  # more than the machine has: the machine's
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{1 << 50}\n")
    assert job_memory({}, tmp_path).source == "MemAvailable in /proc/meminfo"


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("memory") / "raw"
    synth(source, n=8, seed=1, workers=1, min_side=64, max_side=96)
    return source


def test_pack_runs_fewer_workers_in_a_small_allocation_and_says_so(small_source: Path, tmp_path: Path) -> None:
    options = ["--workers", "4", "--max-pixels", "100000000", "--mode", "crop", "--size", "32"]
    env = os.environ | {"SLURM_MEM_PER_NODE": "4500"}  # 1.5 GB per worker; this process holds some of it
    result = run_cli("pack", str(small_source), str(tmp_path / "out"), *options, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "workers instead of" in line]
    assert len(lines) == 1, result.stdout
    found = re.fullmatch(
        r"\[aidetect\] pack: ([1-3]) workers instead of 4: each may hold an image decoded at --max-pixels 100000000 "
        r"\([\d.]+ GB\) and the job has [\d.]+ GB \(SLURM_MEM_PER_NODE=4500 MB, less this process's [\d.]+ GB\); "
        r"--max-pixels (\d+) would let 4 run, as would more memory",
        lines[0],
    )
    assert found and int(found[2]) < 100_000_000, lines[0]
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_pack_stops_when_not_even_one_worker_fits(small_source: Path, tmp_path: Path) -> None:
    env = os.environ | {"SLURM_MEM_PER_NODE": "1000"}
    result = run_cli("pack", str(small_source), str(tmp_path / "out"), env=env)  # the default 250 MP budget
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("aidetect: error: pack: not even one worker fits in memory: each may hold an ")
    assert re.search(r"; lower --max-pixels to \d+ or give the job more memory$", result.stderr.strip())
    assert not (tmp_path / "out").exists()


def peak_rise(path: Path, settings: PackSettings) -> int:
    """How far a forked process's peak resident set rises while it packs ``path``, as a pack worker does."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reset the peak to the present, pack one file, report the rise
        try:
            Path("/proc/self/clear_refs").write_text("5")
            start = status_kb("VmRSS")
            decode_and_preprocess(path, settings)
            os.write(write, str((status_kb("VmHWM") - start) * 1024).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 64) or b"-1")


def status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


@pytest.mark.parametrize(("name", "mode", "most"), [("photo.jpg", "RGB", 11), ("rgba.png", "RGBA", BYTES_PER_PIXEL)])
def test_a_worker_holds_no_more_than_the_bytes_per_pixel_counted(
    tmp_path: Path, name: str, mode: str, most: int
) -> None:
    """The measurement behind BYTES_PER_PIXEL, on a 6 MP file: an RGB photo takes Pillow's 4 bytes per pixel
    and numpy's 3 (twice while converting), an RGBA one its composite on white too; no other copy."""
    pixels = np.random.default_rng(0).integers(0, 256, (2000, 3000, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(tmp_path / name)
    rise = peak_rise(tmp_path / name, PackSettings(mode="crop", size=256))
    assert 0 < rise <= 2000 * 3000 * most, f"{rise / 6e6:.1f} bytes per pixel"
