"""timm backbones (``model.name timm:ARCH``): each ``model.tune`` trains what it says and nothing else, weights
come from local files and the local Hugging Face cache only, runs resume exactly and train under torchrun,
and evaluate and predict rebuild the model with its input side, mean and std. Tiny timm test models at 32 px.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from helpers.commands import run_cli, torchrun
from helpers.training import kill_and_resume, train_args
from safetensors.torch import save_file

from aidetect.checkpoint import load_checkpoint
from aidetect.config import load_config, validate
from aidetect.data.integrity import sha256_file
from aidetect.errors import UserError
from aidetect.inference import evaluate, predict
from aidetect.models import build_model
from aidetect.train import train

VIT, CNN = "test_vit", "test_resnet"
LAST_BLOCK = {VIT: ("blocks.5.", "norm."), CNN: ("layer4.",)}  # what last:1 trains of each backbone


def timm_weights(path: Path, arch: str, **kwargs: int) -> dict[str, torch.Tensor]:
    """A timm model's weights (its classifier included), as a checkpoint file stands in for downloaded ones."""
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model(arch, **kwargs).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def run_in_process(pack: Path, out: Path, arch: str, tune: str, **overrides: object) -> dict:
    """One epoch of ``timm:ARCH`` at 32 px on ``pack`` in this process; its test metrics."""
    keys = {
        "data.shards": str(pack),
        "train.out": str(out),
        "model.name": f"timm:{arch}",
        "model.tune": tune,
        "model.input_size": 32,
        "train.epochs": 1,
        "train.precision": "fp32",
        "data.workers": 0,
        "data.batch_size": 16,
        "optim.lr": 0.01,
    }
    return train(load_config(None, keys | overrides))


def trained_tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Backbone tensor ``key`` of a trained model's state: under a LoRA-adapted layer it is ``base_layer``'s."""
    module, _, leaf = f"backbone.{key}".rpartition(".")
    return state.get(f"backbone.{key}", state.get(f"{module}.base_layer.{leaf}"))


@pytest.mark.parametrize("arch", [VIT, CNN])
@pytest.mark.parametrize("tune", ["full", "probe", "last:1", "lora"])
def test_each_tune_trains_what_it_says_from_local_weights(
    tiny_pack: Path, tmp_path: Path, arch: str, tune: str
) -> None:
    weights = tmp_path / "weights.safetensors"
    initial = timm_weights(weights, arch, **({"img_size": 32} if arch == VIT else {}))
    metrics = run_in_process(tiny_pack, tmp_path / "run", arch, tune, **{"model.pretrained": str(weights)})
    assert 0 <= metrics["auroc"] <= 1
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint.weights_sha256 == sha256_file(weights)
    state = checkpoint.model
    backbone = [k for k in initial if not k.startswith("fc.") and not k.startswith("head.")]  # classifier left out
    changed = {k for k in backbone if not torch.equal(initial[k], trained_tensor(state, k))}
    trainable = len(checkpoint.optimizer["param_groups"][0]["params"])  # the optimiser holds what trains
    model = build_model(f"timm:{arch}", 32)
    if tune == "full":
        assert backbone[0] in changed and trainable == len(list(model.parameters()))
    elif tune == "probe":  # the backbone bit for bit, its BatchNorm statistics too; the head alone trains
        assert changed == set() and trainable == 2
        assert len(checkpoint.optimizer["state"]) == 2
    elif tune == "last:1":
        assert changed and all(k.startswith(LAST_BLOCK[arch]) for k in changed), sorted(changed)
    else:  # lora: the adapters and the head train, no backbone weight moves
        assert changed == set()
        assert any(k.endswith("lora_B.default.weight") and state[k].abs().sum() > 0 for k in state)


def test_hf_hub_weights_come_from_the_local_cache_and_a_missing_one_names_the_fetch_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--tiny-vit" / "snapshots" / "0123abc"
    initial = timm_weights(snapshot / "model.safetensors", VIT)  # at its own 160 px: position embeddings resampled
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("hf-hub:someorg/tiny-vit", str(snapshot.parent.parent)):
        model = build_model(f"timm:{VIT}", 32, spec)
        assert torch.equal(model.backbone.patch_embed.proj.weight, initial["patch_embed.proj.weight"])
        assert model.backbone.pos_embed.shape[1] == 1 + 2 * 2  # resampled to 32 px: 2 x 2 patches and the class token
        assert model.weights.sha256 == sha256_file(snapshot / "model.safetensors")
    with pytest.raises(UserError, match="run 'aidetect weights fetch hf-hub:someorg/missing' on a machine with"):
        build_model(f"timm:{VIT}", 32, "hf-hub:someorg/missing")
    with pytest.raises(UserError, match=r"none of its \d+ tensors fit this model"):
        build_model(f"timm:{CNN}", 32, str(snapshot / "model.safetensors"))


def test_fetch_offline_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "weights", "fetch", f"timm:{VIT}", env=os.environ | {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "weights fetch timm:test_vit: HF_HUB_OFFLINE is set" in result.stderr


def test_bad_names_tunes_and_a_pack_under_the_input_side_are_one_line(tiny_pack: Path, tmp_path: Path) -> None:
    def check(message: str, **overrides: object) -> None:
        config = load_config(None, {"data.shards": str(tiny_pack), "train.out": str(tmp_path / "r")} | overrides)
        with pytest.raises(UserError, match=re.escape(message)) as error:
            validate(config)
            train(config)
        assert "\n" not in str(error.value)

    check("timm has no such model", **{"model.name": "timm:no_such_net"})
    check("model.tune must be full, probe, last:N", **{"model.name": f"timm:{VIT}", "model.tune": "last:0"})
    check("model.tune lora needs a timm backbone", **{"model.tune": "lora"})
    check("config key model.input_size must be positive, got 0", **{"model.name": f"timm:{VIT}", "model.input_size": 0})
    check(
        f"{tiny_pack}: packed at 32 px, under the 160 px input side of timm:{VIT}; repack it with --size 160, "
        "or set model.input_size=32",
        **{"model.name": f"timm:{VIT}"},
    )


def test_evaluate_and_predict_rebuild_the_backbone_with_its_side_mean_and_std(tiny_pack: Path, tmp_path: Path) -> None:
    tested = run_in_process(tiny_pack, tmp_path / "run", VIT, "lora")  # test_vit: mean and std 0.5, not ImageNet's
    evaluated, _ = evaluate(str(tmp_path / "run" / "best.pt"), str(tiny_pack), out=str(tmp_path / "eval"))
    assert evaluated["loss"] == pytest.approx(tested["loss"], abs=1e-6)
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    raw = Path(manifest["source"]["path"])
    files = [str(raw / p) for s in manifest["shards"] if s["split"] == "test" for p in s["paths"]]
    predict(str(tmp_path / "run" / "best.pt"), files, str(tmp_path / "p.csv"))
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    correct = [(r["label"] == "fake") == ("/fake/" in r["path"]) for r in rows]
    assert sum(correct) / len(correct) == pytest.approx(tested["accuracy"])


@pytest.mark.parametrize("tune", ["probe", "lora"])
def test_a_killed_vit_run_resumes_to_bit_identical_weights(tiny_pack: Path, tmp_path: Path, tune: str) -> None:
    args = ["--model", f"timm:{VIT}", "--set", "model.input_size=32", "--set", f"model.tune={tune}", "--epochs", "2"]
    args += ["--batch-size", "8", "--set", "train.deterministic=true"]
    assert kill_and_resume(tiny_pack, tmp_path, args)[1] == []


def test_two_processes_train_a_partly_frozen_backbone(tiny_pack: Path, tmp_path: Path) -> None:
    args = ["--model", f"timm:{VIT}", "--set", "model.input_size=32", "--set", "model.tune=last:1", "--epochs", "1"]
    result = torchrun(*train_args(tiny_pack, tmp_path / "two", *args, "--batch-size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.tune last:1: 41,921 of 300,161 parameters train" in result.stdout
    assert (tmp_path / "two" / "test_metrics.json").is_file()
