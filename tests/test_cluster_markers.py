"""The ``slurm`` and ``multinode`` markers (tests/conftest.py), in pytest sessions of their own whose
``sinfo`` is a stand-in: without a cluster such tests skip with the reason, under CI they fail instead,
and on a one-node cluster the cross-host ones skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.slurm import REPO

NO_CONTROLLER = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"
FAKE_SINFO = {
    "none": f'echo "{NO_CONTROLLER}" >&2; exit 1\n',
    "one node": 'case "$*" in *%N*) echo aidetect-n1 ;; *) echo "debug* up infinite 1 idle aidetect-n1" ;; esac\n',
}


def session(tmp_path: Path, cluster: str, marks: str, ci: str | None) -> subprocess.CompletedProcess:
    """``pytest -m MARKS`` on the cluster test modules with ``cluster``'s stand-in sinfo first on PATH."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sinfo").write_text("#!/bin/sh\n" + FAKE_SINFO[cluster])
    (tmp_path / "bin" / "sinfo").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env |= {"CI": ci} if ci is not None else {}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", marks, "-p", "no:cacheprovider"]
    command += ["--basetemp", str(tmp_path / "session"), "tests/test_slurm.py", "tests/test_multinode.py"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The session's closing line ("3 skipped, 2 errors in 4.1s") as {"skipped": 3, "error": 2}: singular."""
    line = result.stdout.strip().splitlines()[-1]
    return {word.removesuffix("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", line)}


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_a_cluster_the_cluster_tests_skip_with_the_reason(tmp_path: Path, ci: str | None) -> None:
    result = session(tmp_path, "none", "slurm or multinode", ci)
    assert result.returncode == 0, result.stdout[-3000:]
    found = counts(result)
    assert found.get("skipped", 0) > 0 and found.keys() <= {"skipped", "deselected", "warning"}, found
    assert f"no SLURM cluster answers: sinfo failed ({NO_CONTROLLER}); start one with" in result.stdout


def test_under_ci_a_cluster_that_does_not_answer_fails_the_cluster_tests(tmp_path: Path) -> None:
    result = session(tmp_path, "none", "slurm or multinode", "true")
    assert result.returncode == 1, result.stdout[-3000:]
    found = counts(result)
    assert found.get("error", 0) > 0 and found.keys() <= {"error", "deselected", "warning"}, found
    assert result.stdout.count("(CI is set: a cluster test must not skip)") >= found["error"]


def test_cross_host_tests_skip_on_a_one_node_cluster(tmp_path: Path) -> None:
    result = session(tmp_path, "one node", "multinode", None)
    assert result.returncode == 0, result.stdout[-3000:]
    found = counts(result)
    assert found.get("skipped", 0) > 0 and found.keys() <= {"skipped", "deselected", "warning"}, found
    assert "cross-host tests need a cluster of 2 or more nodes, this one has 1 (aidetect-n1)" in result.stdout
