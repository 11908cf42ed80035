from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.commands import run_cli

KEYS = (
    "pack_img_per_s",
    "pack_decode_floor_img_per_s",
    "load_img_per_s",
    "load_decode_floor_img_per_s",
    "load_aug_img_per_s",
    "naive_img_per_s",
)


def test_bench_data_measures_every_stage_and_writes_json(synth_dir: Path, tmp_path: Path) -> None:
    args = ["bench", "data", "--src", str(synth_dir), "--shards", str(tmp_path / "shards")]
    args += ["--naive-limit", "8", "--min-images", "64", "--batch-size", "8", "--workers", "2"]
    for run in range(2):  # first packs into --shards, then into a scratch folder it removes
        result = run_cli(*args, "--json", str(tmp_path / f"bench{run}.json"))
        assert result.returncode == 0, result.stderr
        figures = json.loads((tmp_path / f"bench{run}.json").read_text())
        assert all(figures[key] > 0 for key in KEYS)
        assert figures["load_vs_naive"] == figures["load_img_per_s"] / figures["naive_img_per_s"]
        added_s = 1 / figures["load_aug_img_per_s"] - 1 / figures["load_img_per_s"]
        assert figures["aug_cost_ms_per_img"] == pytest.approx(1000 * 2 * added_s)  # 2 workers
        assert figures["workers"] == 2 and figures["machine"]["cores"] >= 1
        assert "load / naive" in result.stdout and "floor img/s" in result.stdout
        assert "ms per image per worker" in result.stdout
        gpu = torch.cuda.is_available()
        assert (figures["load_gpu_decode_img_per_s"] is None) != gpu and ("no CUDA GPU here" in result.stdout) != gpu
    assert (tmp_path / "shards" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench0.json", "bench1.json", "shards"]


def test_bench_train_compares_the_loop_with_bare_pytorch_and_with_the_loader_feeding_it(
    tiny_pack: Path, tmp_path: Path
) -> None:
    args = ["bench", "train", "--json", str(tmp_path / "train.json"), "--model", "seed_cnn1", "--image-size", "32"]
    args += ["--data", str(tiny_pack), "--workers", "2"]
    result = run_cli(*args, "--batch-size", "8", "--steps", "4", "--precisions", "fp32,bf16,auto")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["loop_overhead_ratio"] == figures["loop_img_per_s"] / figures["bare_img_per_s"] > 0
    assert set(figures["settings"]) == {  # auto is fp32 on the CPU: timed once
        "fp32/contiguous",
        "fp32/channels_last",
        "bf16/contiguous",
        "bf16/channels_last",
    }
    assert all(rate > 0 for rate in figures["settings"].values()) and figures["device"] == "cpu"
    kernel = figures["settings_kernel"]  # what each setting's timed steps cost in the kernel
    assert set(kernel) == set(figures["settings"])
    for cost in kernel.values():
        assert set(cost) == {"minor_faults_per_step", "system_s_per_step"}
        assert all(isinstance(value, (int, float)) and value >= 0 for value in cost.values())
    assert "minor faults/step" in result.stdout and "ms system CPU/step" in result.stdout
    fed = figures["loader_fed"]
    assert fed["pack"] == str(tiny_pack) and fed["workers"] == 2
    assert fed["vs_in_memory"] == fed["img_per_s"] / figures["loop_img_per_s"] > 0
    assert "loop_overhead_ratio" in result.stdout and "fed by the loader (2 workers" in result.stdout
    bad = run_cli("bench", "train", "--precisions", "fp8")
    assert bad.returncode == 2 and "--precisions: unknown fp8" in bad.stderr
