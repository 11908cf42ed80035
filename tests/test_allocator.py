"""The allocator setting every command starts with: freed buffers stay in the process (no fault storm)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aidetect.allocator import USER_SETTINGS

# Allocate and free a 64 MiB buffer 40 times; print the minor page faults of the last 20 (steady state).
PROBE = """
import resource, sys
import torch
if sys.argv[1] == "cli":
    from aidetect import cli
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
faults = []
for _ in range(40):
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(faults[-1] - faults[20])
"""


def steady_faults(how: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how], env=clean | env, capture_output=True, text=True, timeout=120, check=True
    )
    return int(done.stdout.split()[-1])


def test_commands_keep_freed_memory() -> None:
    untouched = steady_faults("plain")
    assert untouched > 19 * 16384 * 0.9  # glibc's default: every 64 MiB buffer faulted in again
    assert steady_faults("cli") < untouched * 0.02  # aidetect.cli.main sets it before anything else


def test_user_allocator_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from aidetect.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() == "user"
    assert steady_faults("cli", MALLOC_MMAP_THRESHOLD_="131072") > 19 * 16384 * 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_reports_glibc() -> None:
    from aidetect.allocator import keep_freed_memory

    assert keep_freed_memory() in ("kept", "kept (mmap off)")
