"""Pretrained weights from local files only, compute nodes without internet included.

``model.pretrained`` is a local ``.safetensors`` or ``.pth``/``.bin`` file, a folder holding one (a
Hugging Face cache folder ``models--ORG--NAME`` or one of its snapshots too), or ``hf-hub:ORG/NAME``:
that repository in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), read without
any network call. ``aidetect weights fetch NAME`` (``fetch``) downloads into that cache on a machine with
internet; a node without the weights is told that command in one line. ``load_backbone_weights`` loads
timm-format weights into a timm backbone (the classifier's keys are left out) and says where from and
their sha256, which the checkpoint records.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aidetect.data.integrity import sha256_file
from aidetect.errors import UserError, first_line

HUB = "hf-hub:"
# Weight file names by preference: timm's hub repositories hold model.safetensors and pytorch_model.bin.
PREFERRED = ("model.safetensors", ".safetensors", "pytorch_model.bin", ".pth", ".bin")
FETCHED = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class LoadedWeights:
    """Where a backbone's weights came from, their sha256, and how many of its tensors they set."""

    path: Path
    sha256: str
    loaded: int
    total: int

    def __str__(self) -> str:
        return f"{self.path} (sha256 {self.sha256}): {self.loaded} of {self.total} backbone tensors"


def hub_cache() -> Path:
    """The Hugging Face cache folder as the environment says now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME", constants.default_home)
    return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def preferred(names: list[str]) -> str | None:
    """The weight file of ``names`` (paths in a repository or folder) by ``PREFERRED``; None without one."""
    for ending in PREFERRED:
        chosen = sorted(name for name in names if name.endswith(ending))
        if chosen:
            return chosen[0]
    return None


def snapshot(folder: Path) -> Path:
    """The folder to read in a Hugging Face cache folder: the snapshot ``refs/main`` names, else the newest
    snapshot; ``folder`` itself when it has no snapshots."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return folder
    ref = folder / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else folder


def resolve(spec: str) -> Path:
    """The local weight file ``model.pretrained`` names; a one-line ``UserError`` when there is none (for
    ``hf-hub:REPO``, naming the ``aidetect weights fetch`` command that puts it in this machine's cache)."""
    if spec.startswith(HUB):
        folder = hub_cache() / f"models--{spec.removeprefix(HUB).replace('/', '--')}"
        found = weights_in(folder) if folder.is_dir() else None
        if found is None:
            raise UserError(
                f"model.pretrained {spec}: not in this machine's Hugging Face cache {hub_cache()}; run "
                f"'aidetect weights fetch {spec}' on a machine with internet (same HF_HOME, or copy {folder.name} here)"
            )
        return found
    path = Path(spec)
    found = path if path.is_file() else weights_in(path) if path.is_dir() else None
    if found is None:
        raise UserError(
            f"{spec}: pretrained weights not found (model.pretrained takes a local .safetensors or .pth file, "
            "a folder holding one, or hf-hub:ORG/NAME from the local Hugging Face cache)"
        )
    return found


def weights_in(folder: Path) -> Path | None:
    """The preferred weight file in ``folder`` (its cache snapshot, ``snapshot``), at any depth."""
    root = snapshot(folder)
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    chosen = preferred(files)
    return root / chosen if chosen else None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a checkpoint's ``state_dict`` or ``model`` entry when it nests one)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a loadable weights file ({first_line(exc)[:120]})") from None
    for key in ("state_dict", "model"):
        state = state.get(key, state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds no state_dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, spec: str) -> LoadedWeights:
    """Load ``model.pretrained`` into a timm ``backbone``: through the architecture's own timm checkpoint
    filter (formats, position embeddings resampled to the input side), every tensor whose name and shape
    fit (the classifier's do not: the backbone has none). A one-line ``UserError`` when none fits."""
    path = resolve(spec)
    state = read_state(path)
    convert = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, backbone)
        except Exception as exc:
            raise UserError(f"{path}: timm cannot convert it for this model ({first_line(exc)[:120]})") from None
    own = backbone.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        unfit = ", ".join(sorted(state)[:4])
        raise UserError(
            f"{path}: none of its {len(state)} tensors fit this model (e.g. {unfit}); another architecture?"
        )
    backbone.load_state_dict(fitting, strict=False)
    return LoadedWeights(path, sha256_file(path), len(fitting), len(own))


def hub_repo(name: str) -> str:
    """The Hugging Face repository of ``hf-hub:REPO`` or ``timm:ARCH`` (timm's pretrained config names it)."""
    if name.startswith(HUB):
        return name.removeprefix(HUB)
    from aidetect.backbones import PREFIX, check_arch

    if not name.startswith(PREFIX):
        raise UserError(f"weights fetch {name}: name timm:ARCH or hf-hub:ORG/NAME")
    import timm

    arch = name.removeprefix(PREFIX)
    check_arch(arch)
    config = timm.models.get_pretrained_cfg(arch)
    if config is None or not config.hf_hub_id:
        raise UserError(f"weights fetch {name}: timm knows no Hugging Face weights for it; name a tagged model")
    return config.hf_hub_id


def fetch(name: str) -> Path:
    """Download the weights of ``name`` (``timm:ARCH`` or ``hf-hub:REPO``: its ``FETCHED`` file) into the local
    Hugging Face cache and return the file; a one-line ``UserError`` offline (``HF_HUB_OFFLINE``), when the
    hub cannot be reached or the repository holds none of ``FETCHED``."""
    from huggingface_hub import constants, get_session, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    repo = hub_repo(name)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"weights fetch {name}: HF_HUB_OFFLINE is set, nothing is downloaded; run it with internet")
    try:  # one request first: the downloads retry a dead network for half a minute
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as exc:
        raise UserError(
            f"weights fetch {name}: no connection to {constants.ENDPOINT} ({first_line(exc)[:120]})"
        ) from None
    for filename in FETCHED:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=hub_cache()))
        except RemoteEntryNotFoundError:
            continue
        except Exception as exc:  # no network, unknown repository, refused: all one line
            raise UserError(f"weights fetch {name}: cannot download {repo} ({first_line(exc)[:160]})") from None
    raise UserError(f"weights fetch {name}: {repo} holds none of {', '.join(FETCHED)}")
