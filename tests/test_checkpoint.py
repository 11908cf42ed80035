"""The checkpoint schema: what save_checkpoint writes load_checkpoint reads back, and one clear line for a
file from a newer aidetect or with a part missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aidetect.checkpoint import VERSION, Checkpoint, RunState, load_checkpoint, rng_state, save_checkpoint
from aidetect.config import Config, ModelConfig
from aidetect.errors import UserError


def small_checkpoint() -> Checkpoint:
    state = RunState(epoch=2, batch=3, step=11, best={"metric": "auroc", "value": 0.9, "epoch": 2})
    return Checkpoint(
        model={"weight": torch.arange(6.0).reshape(2, 3)},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        scheduler={"last_epoch": 11},
        scaler={},
        state=state,
        rng=[rng_state(), rng_state()],
        config=Config(model=ModelConfig(name="seed_cnn1")),
        preprocess={"mode": "crop", "size": 32, "crop": None},
        wandb_id="abc123",
    )


def stored(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_what_is_saved_loads_back_field_by_field(tmp_path: Path) -> None:
    saved = small_checkpoint()
    save_checkpoint(tmp_path / "last.pt", saved)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded.model["weight"], saved.model["weight"])
    assert (loaded.state, loaded.config, loaded.preprocess) == (saved.state, saved.config, saved.preprocess)
    assert (loaded.optimizer, loaded.scheduler, loaded.wandb_id, loaded.version) == (
        saved.optimizer,
        saved.scheduler,
        "abc123",
        VERSION,
    )
    assert len(loaded.rng) == 2 and torch.equal(loaded.rng[1]["torch"], saved.rng[1]["torch"])
    assert stored(tmp_path / "last.pt")["format"] == f"aidetect-checkpoint/{VERSION}"


def test_a_version_1_file_with_the_world_key_still_loads(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "old.pt", small_checkpoint())
    old = stored(tmp_path / "old.pt") | {"world": 2}
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").state.epoch == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": f"aidetect-checkpoint/{VERSION + 1}"}, f"checkpoint version {VERSION + 1} is newer"),
        ({"format": "something-else/1"}, "not an aidetect checkpoint"),
        ({"state": {"epoch": 1, "lap": 3}}, "checkpoint with an unreadable state or config"),
        ({"config": {"model": {"nme": "x"}}}, "config key model.nme is unknown"),
    ],
)
def test_a_newer_or_foreign_file_is_one_line_naming_it(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_checkpoint())
    torch.save(stored(path) | change, path)
    with pytest.raises(UserError, match=message) as raised:
        load_checkpoint(path)
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


def test_a_file_missing_a_part_is_one_line_naming_the_part(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, small_checkpoint())
    torch.save({k: v for k, v in stored(path).items() if k not in ("scaler", "rng")}, path)
    with pytest.raises(UserError) as raised:
        load_checkpoint(path)
    assert str(raised.value) == f"{path}: incomplete checkpoint, no scaler, rng"
