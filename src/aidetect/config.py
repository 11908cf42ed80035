"""Run configuration: a YAML file (or a name from the bundled ``configs/``) plus command-line overrides.

Every key is declared below with its type and default; an unknown key, a wrong type or a missing
data path is reported as one line naming the key (exit code 2). The resolved configuration is saved
in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from aidetect.data.manifest import Selection, run_splits
from aidetect.errors import UserError, first_line
from aidetect.hardware import DEVICES, PRECISIONS
from aidetect.options import add_flags, flag, flag_name, flagged


@dataclass
class DataConfig:
    shards: str | None = field(default=None, metadata=flag("pack folder (aidetect pack OUT)", name="data"))
    fold: int | None = field(
        default=0, metadata=flag("the validation fold, trained on the others; null: train on all, validate on fold 0")
    )
    crop: int | None = None  # training/evaluation crop in px (default: the packed size)
    batch_size: int = field(default=32, metadata=flag("per process"))
    workers: int = 4  # DataLoader workers per process
    decode: str = "cpu"  # cpu: in the workers; gpu: in batches on the training GPU (nvJPEG), workers only read
    noise_std: float = 0.0  # Gaussian noise on [0, 1] images, training only
    # Training augmentation on the stored image, before the crop (aidetect.data.degrade.Augmentation):
    # CNNDetection's blur + JPEG recipe. Seeded per sample: resume and world-size invariance stay exact.
    blur_prob: float = 0.0  # probability of a Gaussian blur ...
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 3.0])  # ... of sigma uniform in [lo, hi] px
    jpeg_prob: float = 0.0  # probability of JPEG re-compression ...
    jpeg_quality: list[int] = field(default_factory=lambda: [30, 100])  # ... at a quality uniform in [lo, hi]
    holdout_source: str | None = field(
        default=None,
        metadata=flag(
            "leave-one-source-out: train and validate without this fake source; test on the real test samples "
            "and every sample of this source (from all splits: none of it was trained on)"
        ),
    )
    # A choice of fake sources (None: all), e.g. a chronological window (submit cv --by time): the fakes train
    # and validation read, and those the test reads (from every split for a source never trained on).
    train_sources: list[str] | None = None
    test_sources: list[str] | None = None
    features: str | None = field(
        default=None,
        metadata=flag("a feature cache of this pack (aidetect features): train the head of model.name on it"),
    )
    # Node-local staging (aidetect.data.stage): none (read the pack where it is), auto ($SLURM_TMPDIR, else
    # $AIDETECT_LOCAL_SCRATCH, which submit exports from the profile's local_scratch) or an absolute folder;
    # $VARS are expanded on each node when the run starts.
    stage: str = "none"

    def selections(self, manifest: dict[str, Any], fold: int | None) -> dict[str, Selection]:
        """The ``train``, ``val`` and ``test`` selections these keys make of a pack (``manifest.run_splits``):
        what training reads, and what evaluating its checkpoint on ``test`` reads again."""
        return run_splits(manifest, fold, self.holdout_source, self.train_sources, self.test_sources)


@dataclass
class ModelConfig:
    name: str = field(default="seed_cnn2", metadata=flag("the architecture, or timm:ARCH", name="model"))
    pretrained: str | None = field(
        default=None,
        metadata=flag("a local weights file or folder, or hf-hub:ORG/NAME from the local cache (aidetect weights)"),
    )
    tune: str = field(
        default="full",
        metadata=flag("what trains: full, probe (the head), last:N (the last N blocks and the head) or lora"),
    )
    input_size: int | None = None  # input side of fixed-size timm backbones (ViTs); None: the backbone's own
    lora_rank: int = 8  # model.tune lora: the adapters' rank ...
    lora_alpha: float = 16.0  # ... and their scale's numerator (alpha / rank)
    channels_last: bool = True
    compile: bool = False


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = field(
        default=1e-3, metadata=flag("for the global batch given; not rescaled with the number of processes")
    )
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    clip_grad: float | None = None  # max gradient norm
    accumulate: int = 1  # gradient accumulation steps


@dataclass
class ScheduleConfig:
    name: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [3, 5])  # epochs (multistep)
    gamma: float = 0.5  # multistep factor
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=flag("passes over the training folds"))
    precision: str = field(
        default="auto", metadata=flag("auto: bf16 at compute capability >= 8.0, fp16 below, fp32 on the CPU")
    )
    device: str = "auto"  # auto: cuda when the job was given GPUs or one is usable
    seed: int = 0
    deterministic: bool = False
    out: str = field(default="runs/train", metadata=flag("the run folder"))
    best_metric: str = "auroc"  # ties go to the lower validation loss
    log_every: int = 20  # steps between progress lines when not on a terminal
    resume: str | None = None  # "auto" (last.pt in out) or a checkpoint path
    # Longest wait of one rank for the others in a collective before it gives up. A dead rank or a lost
    # node usually surfaces at once as a closed connection; this bounds the rest (a cut link, a hung
    # rank). It must exceed the slowest step rank 0 takes alone: a checkpoint write, the epoch's plots.
    dist_timeout_s: int = 300


@dataclass
class WandbConfig:
    mode: str | None = None  # None: offline without an API key
    project: str = "aidetect"
    entity: str | None = None
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# The values these keys take (validate checks them; the command line shows them).
CHOICES = {
    "data.decode": ("cpu", "gpu"),
    "optim.name": ("adam", "adamw", "sgd"),
    "schedule.name": ("multistep", "cosine", "constant"),
    "train.precision": PRECISIONS,
    "train.device": DEVICES,
    "train.best_metric": ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc", "ap", "loss"),
    "wandb.mode": ("online", "offline", "disabled", None),
}


def config_flags() -> dict[str, str]:
    """The command-line options that set one config key each, by ``dest``: ``{"data": "data.shards", ...}``
    (the fields with ``flag`` metadata)."""
    sections = typing.get_type_hints(Config)
    return {flag_name(f): f"{section}.{f.name}" for section, cls in sections.items() for f in flagged(cls)}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and one option per ``config_flags`` key: what every command that runs a config
    takes (``config_from_args`` reads them back)."""
    from aidetect.models import MODELS  # loads torch: only the commands that train add these options

    configs = ", ".join(bundled_configs())
    parser.add_argument("--config", help=f"YAML file or bundled config ({configs}); its keys replace the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    for section, cls in typing.get_type_hints(Config).items():
        add_flags(parser, cls, section, CHOICES | {"model.name": (*MODELS, "timm:ARCH")})


def config_from_args(args: argparse.Namespace) -> Config:
    """The config ``add_config_options`` (and ``--resume``, where the command has it) describe: the
    ``--config`` file, then each ``--set``, then each option given."""
    overrides = dict(parse_override(text) for text in args.set)
    overrides |= {key: getattr(args, dest) for dest, key in config_flags().items() if getattr(args, dest) is not None}
    if getattr(args, "resume", None):
        overrides["train.resume"] = args.resume
    return load_config(args.config, overrides)


def bundled_configs() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in resources.files("aidetect.configs").iterdir() if p.name.endswith(".yaml")
    )


def read_yaml(source: str) -> dict[str, Any]:
    """A config file path, or the name of a bundled config (``smoke``, ``seed_model2``, ...)."""
    path = Path(source)
    if not path.is_file():
        bundled = resources.files("aidetect.configs") / f"{source}.yaml"
        if not bundled.is_file():
            raise UserError(f"{source}: config not found; pass a YAML file or one of {', '.join(bundled_configs())}")
        path = Path(str(bundled))
    return read_mapping(path, "a config is a mapping of sections (data, model, optim, ...)")


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ``what`` says what it should be, in the one-line error."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=3e-4`` -> ("optim.lr", 0.0003): values are parsed as YAML scalars or lists."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise UserError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=3e-4")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_config(source: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides; validated key by key."""
    raw = read_yaml(source) if source else {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"config section {section!r} must be a mapping")
        raw[section][key] = value
    return build(Config, raw, "")


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"config key {prefix}{unknown[0]} is unknown; {prefix or 'sections'}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        hint, dotted = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, f"{dotted}.")
        else:
            values[name] = check_type(dotted, value, hint)
    return cls(**values)


def check_type(key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in allowed:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            item = typing.get_args(option)[0]
            return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise UserError(f"config key {key} must be {names}, got {value!r}")


def check_choice(key: str, value: Any) -> None:
    """One line naming ``key`` and its choices (``CHOICES``) unless ``value`` is one of them."""
    if value not in CHOICES[key]:
        raise UserError(f"config key {key} must be one of {', '.join(map(str, CHOICES[key]))}, got {value!r}")


def validate(config: Config) -> None:
    """Checks across keys, and those that need the file system (after overrides are applied)."""
    for dotted in CHOICES:
        section, key = dotted.split(".")
        check_choice(dotted, getattr(getattr(config, section), key))
    from aidetect.models import check_model

    check_model(config.model.name, config.model.tune)
    positive = {
        "data.batch_size": config.data.batch_size,
        "train.epochs": config.train.epochs,
        "optim.accumulate": config.optim.accumulate,
        "optim.lr": config.optim.lr,
        "train.dist_timeout_s": config.train.dist_timeout_s,
        "model.lora_rank": config.model.lora_rank,
        "model.input_size": 1 if config.model.input_size is None else config.model.input_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key} must be positive, got {value}")
    check_augmentation(config.data)
    check_stage(config.data.stage)
    if not config.data.shards:
        raise UserError("config key data.shards is not set; pass --data PACK_DIR (made by aidetect pack)")
    if not (Path(config.data.shards) / "manifest.json").is_file():
        raise UserError(
            f"data.shards {config.data.shards}: no manifest.json there; run 'aidetect pack SRC {config.data.shards}'"
        )


def check_augmentation(data: DataConfig) -> None:
    ranges = {"data.blur_sigma": (data.blur_sigma, 0, float("inf")), "data.jpeg_quality": (data.jpeg_quality, 1, 100)}
    for key, (bounds, low, high) in ranges.items():
        if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
            raise UserError(f"config key {key} must be [lo, hi] with {low} <= lo <= hi <= {high}, got {bounds}")
    for key, value in {"data.blur_prob": data.blur_prob, "data.jpeg_prob": data.jpeg_prob}.items():
        if not 0 <= value <= 1:
            raise UserError(f"config key {key} must be a probability in [0, 1], got {value}")


def check_stage(stage: str) -> None:
    """``UserError`` unless ``stage`` is none, auto or an absolute folder (``$VAR/...`` too: expanded on the node)."""
    if stage not in ("none", "auto") and not stage.startswith(("/", "$")):
        raise UserError(f"config key data.stage must be none, auto or an absolute folder on the node, got {stage!r}")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    from aidetect.fileio import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
