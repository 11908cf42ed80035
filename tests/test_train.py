from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.commands import run_cli, signal_group_at, torchrun, torchrun_command
from helpers.training import AUGMENTED, kill_and_resume, train_args, weights

from aidetect.checkpoint import load_checkpoint
from aidetect.config import CHOICES, Config, OptimConfig, ScheduleConfig, bundled_configs, load_config, validate
from aidetect.data.degrade import Augmentation
from aidetect.errors import UserError
from aidetect.hardware import set_cuda_environment
from aidetect.metrics import METRIC_KEYS
from aidetect.train import (
    CURVES_EVERY_S,
    OPTIMIZERS,
    SCHEDULES,
    Trainer,
    augmentation,
    build_optimizer,
    build_scheduler,
    seed_everything,
)


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_pack: Path, tmp_path: Path) -> None:
    one = run_cli(*train_args(tiny_pack, tmp_path / "one", *AUGMENTED, "--batch-size", "8"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*train_args(tiny_pack, tmp_path / "two", *AUGMENTED, "--batch-size", "4"))
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:  # rounding differs (per-rank convolutions, all-reduce order) and Adam magnifies it, but
        # stays under a tenth of one Adam step (lr 1e-3): a sample trained on by one run only would not.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)
    one_metrics = json.loads((tmp_path / "one" / "test_metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "test_metrics.json").read_text())
    assert one_metrics["samples"] == two_metrics["samples"] > 0
    assert abs(one_metrics["auroc"] - two_metrics["auroc"]) < 1e-3


def test_metrics_under_two_ranks_equal_one_rank(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_pack, run, "--epochs", "1", "--batch-size", "8")).returncode == 0

    def evaluate_args(out: Path) -> list[str]:
        return ["evaluate", str(run / "best.pt"), "--data", str(tiny_pack), "--split", "fold0", "--out", str(out)]

    single = run_cli(*evaluate_args(tmp_path / "single"), "--batch-size", "5")
    assert single.returncode == 0, single.stderr[-2000:]
    double = torchrun(*evaluate_args(tmp_path / "double"), "--batch-size", "5")
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads((tmp_path / "single" / "eval_fold0.json").read_text())
    two = json.loads((tmp_path / "double" / "eval_fold0.json").read_text())
    fold_size = json.loads((tiny_pack / "manifest.json").read_text())["splits"]["fold0"]["total"]
    assert one["samples"] == two["samples"] == fold_size  # every sample once, not rank 0's share
    for key in METRIC_KEYS:
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
    assert set(one["per_source"]["sources"]) == {"real", "fake"} and one["per_source"] == two["per_source"]


def test_killed_run_resumes_to_bit_identical_weights(tiny_pack: Path, tmp_path: Path) -> None:
    args = ["--batch-size", "8", "--set", "train.deterministic=true", *AUGMENTED]
    assert kill_and_resume(tiny_pack, tmp_path, args)[1] == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_saves_the_position_and_resume_continues_exactly(
    tiny_pack: Path, tmp_path: Path, signum: int
) -> None:
    args = ["--batch-size", "8", "--set", "train.deterministic=true", "--set", "data.workers=2", *AUGMENTED]
    reference = run_cli(*train_args(tiny_pack, tmp_path / "reference", *args))
    assert reference.returncode == 0
    out = tmp_path / "preempted"
    command = [sys.executable, "-m", "aidetect.cli", *train_args(tiny_pack, out, *args)]
    process = signal_group_at(command, "epoch 2 batch 2/", signum)  # DataLoader workers get it too
    assert process.returncode == 3, process.stderr[-2000:]
    assert "Traceback" not in process.stderr and "stopped by a signal" in process.stderr
    state = load_checkpoint(out / "last.pt").state
    assert state.epoch == 1 and state.batch >= 2  # mid-epoch: the position is saved
    assert (out / "curves.png").is_file()  # epoch 1 took under CURVES_EVERY_S: drawn on the stop
    first_id = load_checkpoint(out / "last.pt").wandb_id
    resumed = run_cli(*train_args(tiny_pack, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "reference"), weights(out)
    assert all(torch.equal(a[key], b[key]) for key in a)
    runs = sorted(out.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)  # the same wandb run continues


def test_sigterm_to_a_torchrun_group_checkpoints_every_rank_and_resumes(tiny_pack: Path, tmp_path: Path) -> None:
    args = ["--batch-size", "4", "--epochs", "2", "--set", "train.deterministic=true", "--set", "data.workers=2"]
    reference = torchrun(*train_args(tiny_pack, tmp_path / "reference", *args))
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "preempted"
    command = torchrun_command("-m", "aidetect.cli", *train_args(tiny_pack, out, *args))
    process = signal_group_at(command, "epoch 2 batch 2/", signal.SIGTERM, env=os.environ | {"OMP_NUM_THREADS": "1"})
    # torchrun itself reports the signal (exit 1); each rank saved its part and exited 3.
    assert process.stderr.count("aidetect: stopped by a signal") == 2, process.stderr[-3000:]
    state = load_checkpoint(out / "last.pt").state
    assert state.epoch == 1 and state.batch >= 2 and len(load_checkpoint(out / "last.pt").rng) == 2
    resumed = torchrun(*train_args(tiny_pack, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "reference"), weights(out)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_paths_run_on_cpu(tiny_pack: Path, tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "1", "--precision", precision, "--model", "seed_cnn2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cpu, {precision}" in result.stdout
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(METRIC_KEYS) <= metrics.keys() and metrics["loss"] == metrics["loss"]  # not NaN
    scaler = load_checkpoint(out / "last.pt").scaler
    assert bool(scaler) == (precision == "fp16")  # GradScaler only for fp16


def test_outputs_plots_and_offline_wandb_without_secrets(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = os.environ | {"WANDB_API_KEY": "secret-key-0123456789abcdef0123456789abcdef01234567", "WANDB_MODE": "offline"}
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "2", "--batch-size", "8"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(METRIC_KEYS) <= r["val"].keys() for r in rows)
    plots = ("curves.png", "test_confusion.png", "test_roc.png", "test_pr.png", "test_per_source.png")
    for name in (*plots, "config.yaml", "best.pt"):
        assert (out / name).stat().st_size > 0, name
    assert "shortcut audit: a metadata-only baseline reaches" in result.stdout and "WARNING" not in result.stdout
    records = list(out.glob("wandb/offline-run-*/run-*.wandb"))  # what `wandb sync` uploads later
    assert len(records) == 1
    logged = records[0].read_bytes()  # protobuf records: keys are stored as plain UTF-8
    for key in ("test/accuracy", "test/misclassified", "val/confusion", "train/loss", "audit/metadata_auroc"):
        assert key.encode() in logged, key
    leaked = [p for p in out.rglob("*") if p.is_file() and b"secret-key-0123" in p.read_bytes()]
    assert not leaked


def test_evaluate_and_predict_reproduce_the_test_metrics(tiny_pack: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_pack, run, "--epochs", "2", "--batch-size", "8")).returncode == 0
    result = run_cli("evaluate", str(run / "best.pt"), "--data", str(tiny_pack))
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((run / "eval_test.json").read_text())
    tested = json.loads((run / "test_metrics.json").read_text())
    assert {k: evaluated[k] for k in METRIC_KEYS} == pytest.approx({k: tested[k] for k in METRIC_KEYS})
    assert evaluated["per_source"] == tested["per_source"]  # train's and evaluate's per-source tables agree
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    raw = Path(manifest["source"]["path"])
    test_files = [raw / p for s in manifest["shards"] if s["split"] == "test" for p in s["paths"]]
    predicted = run_cli(
        "predict",
        str(run / "best.pt"),
        *map(str, test_files),
        str(raw / "real" / "empty.jpg"),
        "--csv",
        str(tmp_path / "p.csv"),
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    import csv

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[-1]["error"] == "empty file (0 bytes)" and rows[-1]["prob_fake"] == ""
    correct = [(r["label"] == "fake") == ("/fake/" in r["path"]) for r in rows[:-1]]
    assert sum(correct) / len(correct) == pytest.approx(tested["accuracy"])  # the same preprocessing as training
    by_source: dict[str, list[bool]] = {}  # by hand: this pack's files lie straight in their class folder
    for row, ok in zip(rows[:-1], correct, strict=True):
        by_source.setdefault(Path(row["path"]).parent.name, []).append(ok)
    assert {s: (len(v), pytest.approx(sum(v) / len(v))) for s, v in by_source.items()} == {
        s: (e["n"], e["accuracy"]) for s, e in tested["per_source"]["sources"].items()
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optim.lrr=1"], "config key optim.lrr is unknown"),
        (["--set", "optim.lr=fast"], "config key optim.lr must be float"),
        (["--set", "train.precision=fp8"], "train.precision must be one of"),
        (["--config", "nonexistent"], "nonexistent: config not found"),
        (["--set", "model.name=vgg"], "model.name 'vgg' is unknown"),
        (["--set", "data=3"], "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_config_is_one_clear_line(tiny_pack: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("train", "--data", str(tiny_pack), "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_gpu_decoding_without_a_gpu_is_one_clear_line(tiny_pack: Path, tmp_path: Path) -> None:
    result = run_cli(*train_args(tiny_pack, tmp_path / "r", "--set", "data.decode=gpu"))
    assert result.returncode == 2 and "data.decode gpu needs a CUDA device" in result.stderr, result.stderr[-1000:]
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", bundled_configs())
def test_bundled_configs_load_and_validate(tmp_path: Path, name: str) -> None:
    (tmp_path / "manifest.json").write_text("{}")  # validate only checks that the pack has one
    validate(load_config(name, {"data.shards": str(tmp_path)}))


def test_forensic_config_trains_with_cnndetection_blur_and_jpeg_at_probability_0_1() -> None:
    config = load_config("forensic_resnet50")
    assert augmentation(config.data) == Augmentation(0.1, (0.0, 3.0), 0.1, (30, 100))
    assert (config.model.name, config.data.crop) == ("resnet50", 224)


def test_missing_data_and_corrupt_checkpoints_are_one_clear_line(tiny_pack: Path, tmp_path: Path) -> None:
    missing = run_cli("train", "--config", "smoke", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert missing.returncode == 2 and "no manifest.json there" in missing.stderr
    run = tmp_path / "run"
    assert run_cli(*train_args(tiny_pack, run, "--epochs", "1", "--batch-size", "8")).returncode == 0
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint at all")
    for args in (
        train_args(tiny_pack, run, "--resume", "auto"),
        ["evaluate", str(tmp_path / "foreign.pt"), "--data", str(tiny_pack)],
        ["predict", str(tmp_path / "missing.pt"), str(tiny_pack)],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr[-1000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "checkpoint" in result.stderr


def test_srun_style_environment_runs_ddp_without_torchrun(tiny_pack: Path, tmp_path: Path) -> None:
    """Two processes given only what srun sets (SLURM_PROCID, SLURM_NTASKS, ...) plus the rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "aidetect.cli", *train_args(tiny_pack, tmp_path / "srun", "--epochs", "1")]
    processes = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env |= {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        processes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:]
    assert "on 2 process(es)" in outputs[0][0] and outputs[1][0] == ""  # only rank 0 prints
    assert (tmp_path / "srun" / "test_metrics.json").is_file()


def test_gradient_accumulation_matches_a_larger_batch(tiny_pack: Path, tmp_path: Path) -> None:
    common = ["--epochs", "1", "--set", "data.noise_std=0", "--set", "optim.clip_grad=1000"]
    big = run_cli(*train_args(tiny_pack, tmp_path / "big", *common, "--batch-size", "8"))
    small = run_cli(
        *train_args(tiny_pack, tmp_path / "acc", *common, "--batch-size", "4", "--set", "optim.accumulate=2")
    )
    assert big.returncode == 0 and small.returncode == 0, small.stderr[-2000:]
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_failing_wandb_does_not_stop_training(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb").write_text("a file where wandb wants its folder")
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "1"), env=os.environ | {"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb disabled after an error" in result.stderr
    assert (out / "test_metrics.json").is_file()


def test_torch_compile_path_trains(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "compiled"
    result = run_cli(*train_args(tiny_pack, out, "--epochs", "1", "--batch-size", "8", "--set", "model.compile=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(out / "best.pt").model.keys() == load_checkpoint(out / "last.pt").model.keys()
    assert not any(key.startswith("_orig_mod") for key in load_checkpoint(out / "last.pt").model)  # plain weights


def test_every_optimizer_and_schedule_choice_is_built_and_no_other() -> None:
    assert set(OPTIMIZERS) == set(CHOICES["optim.name"]) and set(SCHEDULES) == set(CHOICES["schedule.name"])
    model = torch.nn.Linear(2, 1)
    with pytest.raises(UserError) as unknown_optimizer:
        build_optimizer(model, OptimConfig(name="lamb"))
    assert str(unknown_optimizer.value) == "config key optim.name must be one of adam, adamw, sgd, got 'lamb'"
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    with pytest.raises(UserError) as unknown_schedule:
        build_scheduler(optimizer, Config(schedule=ScheduleConfig(name="linear")), 10)
    assert str(unknown_schedule.value) == (
        "config key schedule.name must be one of multistep, cosine, constant, got 'linear'"
    )


def test_a_deterministic_cuda_run_needs_the_cublas_workspace_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(UserError) as refused:
        seed_everything(0, True, torch.device("cuda"))  # refused before any CUDA work
    assert (
        str(refused.value) == "train.deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts"
    )
    set_cuda_environment(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_cuda_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own (deterministic) choice is kept
    set_cuda_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_curves_are_redrawn_at_most_every_curves_every_s_and_always_when_final(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clock, drawn = [1000.0], []
    monkeypatch.setattr("aidetect.train.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("aidetect.train.plots.training_curves", lambda history, path: drawn.append(len(history)))
    trainer = SimpleNamespace(info=SimpleNamespace(is_main=True), state=SimpleNamespace(history=[]), out=tmp_path)
    trainer.curves_drawn = clock[0]  # the start
    trainer.state.history.append({"epoch": 1})
    Trainer.draw_curves(trainer, final=False)  # a short epoch: not yet
    clock[0] += CURVES_EVERY_S
    Trainer.draw_curves(trainer, final=False)  # CURVES_EVERY_S since the start
    trainer.state.history.append({"epoch": 2})
    clock[0] += 1
    Trainer.draw_curves(trainer, final=False)  # 1 s since the last drawing: not yet
    Trainer.draw_curves(trainer, final=True)  # the last epoch or a stop: always
    trainer.info.is_main = False
    Trainer.draw_curves(trainer, final=True)  # only rank 0 draws
    assert drawn == [1, 2]
