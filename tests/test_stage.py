"""Node-local staging (data.stage): copies checked against the manifest, kept across runs on a node, copied
again when damaged; and a two-host job that reads its nodes' copies trains exactly as one reading the pack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.slurm import ARGS, REPO, hosts_of_ranks, submit_cli, two_rank_run
from helpers.training import weights

from aidetect.config import load_config, validate
from aidetect.data.manifest import read_manifest, verify_shards
from aidetect.data.stage import LOCAL_SCRATCH_ENV, check_space, stage_folder, stage_pack
from aidetect.errors import UserError


def stage(pack: Path, folder: Path | str) -> Path:
    """Stage ``pack`` into ``folder`` as a node's local rank 0 does, in this process alone."""
    return Path(stage_pack(str(pack), str(folder), local_rank=0, timeout_s=60))


def shard_names(pack: Path) -> list[str]:
    return sorted(entry["name"] for entry in read_manifest(pack)["shards"])


def test_a_staged_pack_is_verified_and_a_second_run_reuses_it_without_copying(
    tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = stage(tiny_pack, tmp_path / "node")
    names = shard_names(tiny_pack)
    assert folder == tmp_path / "node" / tiny_pack.name
    assert sorted(p.name for p in folder.glob("*.tar")) == names and verify_shards(folder) == []
    assert not list(folder.glob(".*"))  # no temporary file left behind
    before = {name: (folder / name).stat() for name in names}
    assert stage(tiny_pack, tmp_path / "node") == folder
    after = {name: (folder / name).stat() for name in names}
    assert all((before[n].st_ino, before[n].st_mtime_ns) == (after[n].st_ino, after[n].st_mtime_ns) for n in names)
    first, second = capsys.readouterr().out.splitlines()
    assert f"{len(names)} shard(s) copied" in first and "MB/s" in first
    assert f"0 shard(s) copied (0.0 MB), {len(names)} already there and verified" in second


@pytest.mark.parametrize("damage", ["a flipped byte", "truncated"])
def test_a_damaged_staged_copy_is_found_and_copied_again(
    tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    folder = stage(tiny_pack, tmp_path / "node")
    shard = folder / shard_names(tiny_pack)[1]
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        del data[-512:]
    else:  # same size: only its sha256 tells
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    stage(tiny_pack, tmp_path / "node")
    assert shard.read_bytes() == (tiny_pack / shard.name).read_bytes()
    assert "1 shard(s) copied" in capsys.readouterr().out.splitlines()[-1]


def test_a_damaged_shard_of_the_pack_is_named_and_not_staged(tiny_pack: Path, tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    shard = pack / shard_names(pack)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(UserError) as caught:
        stage(pack, tmp_path / "node")
    assert str(caught.value).startswith(f"{shard}: damaged shard, its sha256 differs") and "\n" not in str(caught.value)
    staged = tmp_path / "node" / "pack"
    assert not (staged / shard.name).exists() and not list(staged.glob(".*"))


def test_auto_stages_under_slurm_tmpdir_else_the_profile_local_scratch(
    tiny_pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.setenv("TEST_NODE", "n7")
    monkeypatch.setenv(LOCAL_SCRATCH_ENV, f"{tmp_path}/scratch-$TEST_NODE")  # expanded on the node
    assert stage_folder(str(tiny_pack), "auto") == tmp_path / "scratch-n7" / tiny_pack.name
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job"))
    assert stage_folder(str(tiny_pack), "auto") == tmp_path / "job" / tiny_pack.name
    assert stage_pack(str(tiny_pack), "none", local_rank=0, timeout_s=60) == str(tiny_pack)


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("auto", "data.stage auto: neither SLURM_TMPDIR nor AIDETECT_LOCAL_SCRATCH is set"),
        ("{tmp}/$TEST_UNSET_VARIABLE", "still names an unset environment variable"),
        ("{tmp}/a-file/node", "data.stage: cannot create"),
        ("{pack_parent}", "onto itself"),
    ],
)
def test_a_stage_folder_that_cannot_be_used_is_one_line(
    tiny_pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str, message: str
) -> None:
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.delenv(LOCAL_SCRATCH_ENV, raising=False)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match=message) as caught:
        stage(tiny_pack, folder.format(tmp=tmp_path, pack_parent=tiny_pack.parent))
    assert "\n" not in str(caught.value)


def test_staging_stops_when_the_node_folder_lacks_room(tmp_path: Path) -> None:
    check_space(tmp_path, 0)
    with pytest.raises(UserError, match=r"GB free, staging the pack needs [\d.]+ GB more"):
        check_space(tmp_path, shutil.disk_usage(tmp_path).free + 10**9)


def test_data_stage_is_none_auto_or_an_absolute_folder(tiny_pack: Path) -> None:
    for value in ("none", "auto", "/scratch/me", "$SLURM_TMPDIR/aidetect"):
        validate(load_config(None, {"data.shards": str(tiny_pack), "data.stage": value}))
    with pytest.raises(UserError, match=r"key data\.stage must be none, auto or an absolute folder"):
        validate(load_config(None, {"data.shards": str(tiny_pack), "data.stage": "scratch"}))


@pytest.mark.multinode
def test_a_two_host_job_trains_on_its_nodes_copies_exactly_as_on_the_pack(
    tiny_pack: Path, tmp_path: Path, nodes: list[str]
) -> None:
    two_rank_run(tiny_pack, tmp_path / "reference")
    # The hosts share this file system: a folder per host name stands for each node's own disk.
    profile = tmp_path / "staging.yaml"
    profile.write_text((REPO / "hpc" / "local.yaml").read_text() + f"local_scratch: {tmp_path}/$SLURMD_NODENAME\n")
    run = tmp_path / "run"
    options = ["--profile", str(profile), "--nodes", "2", "--tasks-per-node", "1", "--wait", "--set", "data.stage=auto"]
    result = submit_cli("train", *options, "--data", str(tiny_pack), "--out", str(run), *ARGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = Path(json.loads((run / "jobs.json").read_text())["jobs"][0]["stdout"])
    used = hosts_of_ranks(log)
    assert len(used) == 2 and set(used) <= set(nodes)
    logs = "".join(path.read_text() for path in log.parent.glob("*_log.out"))
    for host in used:
        folder = tmp_path / host / tiny_pack.name
        assert sorted(p.name for p in folder.glob("*.tar")) == shard_names(tiny_pack) and verify_shards(folder) == []
        assert f"to {folder} on {host}: {len(shard_names(tiny_pack))} shard(s) copied" in logs
    reference, staged = weights(tmp_path / "reference"), weights(run)
    assert all(torch.equal(reference[key], staged[key]) for key in reference)
