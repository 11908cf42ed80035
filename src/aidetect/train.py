"""``aidetect train``: the training driver, the same code path for 1 process, torchrun and srun.

Each epoch trains, then evaluates on the validation fold in eval mode with no gradients; ``best.pt``
(by ``train.best_metric``, with the temperature that calibrates its validation logits and the
validation threshold) and ``last.pt`` are kept; after the last epoch ``best.pt`` is evaluated on the test
split into ``test_metrics.json`` (``metrics.report_metrics``: intervals, calibration before and after the
temperature). A stop signal (SIGTERM, SIGINT, SIGUSR1/2: see
``aidetect.preemption``) makes every rank stop at the same step and save ``last.pt`` with its position,
and ``--resume auto`` continues from there with the same data order, augmentation and RNG states.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aidetect import models, plots
from aidetect.audit import audit
from aidetect.backbones import Tuning
from aidetect.calibration import fit_temperature
from aidetect.checkpoint import Checkpoint, RunState, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from aidetect.config import Config, DataConfig, ModelConfig, OptimConfig, check_choice, save_config, validate
from aidetect.data.degrade import Augmentation
from aidetect.data.loader import ShardLoader, build_loader
from aidetect.data.manifest import Selection, check_holdout, check_sources, read_manifest
from aidetect.data.stage import stage_pack
from aidetect.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    cleanup_distributed,
    peers_watched,
    setup_distributed,
)
from aidetect.engine import Progress, ProgressStyle, TrainingParts, evaluate, stop_check, train_one_epoch
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json
from aidetect.hardware import DETERMINISTIC_CUBLAS, memory_named, resolve_precision
from aidetect.metrics import (
    Predictions,
    compute_metrics,
    format_calibration_line,
    format_per_source,
    is_better,
    report_metrics,
    val_threshold,
)
from aidetect.preemption import Stopped, StopRequest
from aidetect.probe import check_cache, features_loader, probe_model
from aidetect.scores import save_scores
from aidetect.tracking import Tracker

# curves.png is redrawn at most this often (and always after the last epoch and on a stop): a run of short
# epochs, a probe on cached features, would otherwise spend most of its time drawing it.
CURVES_EVERY_S = 30.0


def train(config: Config) -> dict[str, Any]:
    """Run the configured training; returns the test metrics of the best checkpoint. Raises ``Stopped``
    after saving ``last.pt`` when a stop signal arrived (see ``aidetect.preemption``)."""
    validate(config)
    info = setup_distributed(config.train.dist_timeout_s, config.train.device)
    try:
        with StopRequest() as stop, peers_watched(info), memory_named(config.data.batch_size, info.device):
            staged = stage_pack(config.data.shards, config.data.stage, info.local_rank, config.train.dist_timeout_s)
            trainer = Trainer(config, info, stop, staged)
            with trainer.loaders["train"], trainer.loaders["val"]:  # their workers end here, also on an error
                return trainer.run()
    finally:
        cleanup_distributed(info)


class Trainer:
    """One process's part of a training run (every process of the run makes one, with the same config).

    Built from the config (``build_*``), resumed from ``train.resume`` when set (``last.pt`` with
    ``auto``); ``run()`` then trains each remaining epoch, validates it, keeps ``best.pt`` and ``last.pt``,
    and finally tests ``best.pt`` and returns its test metrics. Rank 0 writes everything under
    ``train.out`` (config.yaml, metrics.jsonl, curves.png, the checkpoints, test_metrics.json and plots)
    and logs; every rank must call ``run()``, which makes collective calls (all-gathers, barriers, the stop
    agreement). A stop signal makes all ranks save ``last.pt`` at the same step and raise ``Stopped``; bad
    input is a ``UserError`` before any training. ``shards``: where this node reads the pack
    (``config.data.shards``, or its staged copy); the config is recorded as given."""

    def __init__(self, config: Config, info: DistInfo, stop: StopRequest, shards: str) -> None:
        self.config, self.info, self.stop, self.shards = config, info, stop, shards
        self.out = Path(config.train.out)
        self.manifest = read_manifest(shards)
        check_inputs(config, shards, info.device)
        self.precision = resolve_precision(config.train.precision, info.device)
        seed_everything(config.train.seed + info.rank, config.train.deterministic, info.device)
        self.splits = config.data.selections(self.manifest, config.data.fold)
        self.loaders = {name: self.make_loader(name) for name in ("train", "val")}
        self.crop = run_crop(config, shards)  # recorded in every checkpoint
        self.model = build_trained_model(config.model, self.crop or self.manifest["settings"]["size"], info.device)
        if config.data.features:  # a linear probe: the head trains on cached features of the cache's backbone
            self.model = probe_model(self.model, config.data.features)
        self.channels_last = config.model.channels_last and not config.data.features  # features are N x D
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config, len(self.loaders["train"]))
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.precision == "fp16")
        self.state = RunState()
        self.curves_drawn = time.monotonic()  # when curves.png was last drawn (draw_curves), or the start
        resumed = self.resume()
        self.tracker = Tracker(config, self.out, resumed.wandb_id if resumed else None, enabled=info.is_main)

    # -- setup ------------------------------------------------------------------------------------

    def make_loader(self, split: str) -> ShardLoader:
        return build_split_loader(self.config, self.info, self.shards, self.splits[split], split == "train")

    def resume(self) -> Checkpoint | None:
        """Load ``train.resume`` into the model, optimiser, scheduler, scaler, position and RNG states, and
        return it; None when there is nothing to resume."""
        source = self.config.train.resume
        path = self.out / "last.pt" if source == "auto" else Path(source) if source else None
        if path is None or (source == "auto" and not path.exists()):
            return None
        checkpoint = load_checkpoint(path)
        self.check_global_batch(path, checkpoint)
        unwrap(self.model).load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.state = checkpoint.state
        saved = len(checkpoint.rng)
        if self.info.rank < saved:
            set_rng_state(checkpoint.rng[self.info.rank])
        if saved != self.info.world:
            restored = min(saved, self.info.world)
            self.log(
                f"resumed on {self.info.world} process(es) a run saved by {saved}: the global batch is the same, so "
                f"the data position is exact; RNG states (dropout) restored for ranks 0..{restored - 1}"
                + (f", ranks {saved}.. seeded anew" if self.info.world > saved else "")
            )
        pending = " (epoch trained, validation pending)" if self.state.pending else ""
        self.log(f"resumed from {path} at epoch {self.state.epoch + 1}, batch {self.state.batch}{pending}")
        return checkpoint

    def check_global_batch(self, path: Path, checkpoint: Checkpoint) -> None:
        """``UserError`` unless this run's global batch (processes x batch size, and accumulation) is the saved
        run's: the saved position counts global batches, which mean other samples under another global batch."""
        data, optim, world = checkpoint.config.data, checkpoint.config.optim, self.info.world
        saved_world = len(checkpoint.rng)  # one RNG state per process that saved it
        saved, ours = saved_world * data.batch_size, world * self.config.data.batch_size
        if saved == ours and optim.accumulate == self.config.optim.accumulate:
            return
        fits = f"data.batch_size {saved // world}" if saved % world == 0 else "another number of processes"
        raise UserError(
            f"{path}: saved by {saved_world} process(es) x data.batch_size {data.batch_size} x optim.accumulate "
            f"{optim.accumulate}; this run is {world} x {self.config.data.batch_size} x "
            f"{self.config.optim.accumulate}: continue with {fits} and the same accumulate, or use a new run folder"
        )

    def training_parts(self) -> TrainingParts:
        """What the step uses: the model DDP-wrapped over the processes and compiled when so configured."""
        model: nn.Module = self.model
        if self.info.world > 1:
            device_ids = [self.info.device] if self.info.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        if self.config.model.compile:
            model = torch.compile(model)
        return TrainingParts(
            model=model,
            optimizer=self.optimizer,
            scaler=self.scaler,
            scheduler=self.scheduler,
            device=self.info.device,
            precision=self.precision,
            accumulate=self.config.optim.accumulate,
            clip=self.config.optim.clip_grad,
            channels_last=self.channels_last,
        )

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out / "config.yaml")
        config, parts = self.config, self.training_parts()
        self.log(
            f"training {config.model.name} on {self.info.world} process(es), {self.info.device.type}, "
            f"{self.precision}; {len(self.loaders['train'])} batches per epoch per process"
        )
        self.log(f"ranks by host: {ranks_by_host(list(self.info.hosts))}")
        trainable, total = models.count_trainable(self.model)
        self.log(f"model.tune {config.model.tune}: {trainable:,} of {total:,} parameters train")
        if getattr(self.model, "weights", None):
            self.log(f"pretrained weights: {self.model.weights}")
        if self.info.is_main:
            self.audit_shortcuts()
        for epoch in range(self.state.epoch, config.train.epochs):
            with self.stop.deferred():  # acted on at a step all ranks agree on, after saving last.pt
                summary = self.state.pending or self.train_epoch(parts, epoch)
                self.end_epoch(epoch, summary)
        return self.test()

    def train_epoch(self, parts: TrainingParts, epoch: int) -> dict[str, float]:
        """Train the rest of ``epoch``; returns its summary (every rank's mean loss, images per second). On a
        stop agreed by every rank, saves ``last.pt`` with the position and raises ``Stopped``. A signal is
        acted on within ``train.log_every`` batches: the ranks agree on it that often."""
        start_batch, loader = self.state.batch, self.loaders["train"]
        loader.set_epoch(epoch, start_batch)
        progress = Progress(epoch, start_batch, len(loader), self.info.world, progress_style(self.info.is_main))
        result = train_one_epoch(
            parts,
            loader,
            progress,
            start_batch=start_batch,
            log_every=self.config.train.log_every,
            tracker=self.tracker,
            stop=self.stop,
        )
        progress.close()
        self.state.step = self.scheduler.last_epoch
        if result.stopped:
            self.state.epoch, self.state.batch = epoch, start_batch + result.batches
            self.leave(f"at epoch {epoch + 1}, batch {self.state.batch}")
        return {
            "train_loss": float(np.mean(all_gather_objects(result.loss))),
            "img_per_s": result.images * self.info.world / max(result.seconds, 1e-9),
        }

    def leave(self, where: str) -> None:
        """Save ``last.pt`` with the position in ``self.state`` and raise ``Stopped``, every rank together."""
        self.draw_curves(final=True)
        self.save("last.pt")
        self.log(f"stopped by {self.stop.signal_name} {where}")
        self.tracker.finish()
        barrier()  # every rank leaves together: under srun --kill-on-bad-exit, none is killed mid-save
        raise Stopped(f"{self.out / 'last.pt'} holds its position; continue with --resume auto")

    def audit_shortcuts(self) -> None:
        """The shortcut audit's verdict on this pack (metadata only, seconds), in the log and in wandb."""
        shards = self.config.data.shards  # named as given; read where this node reads it
        try:
            report = audit(self.shards)
        except UserError as exc:  # a damaged shard too: the loaders stop on it with its sha256 verdict
            self.log(f"shortcut audit skipped: {exc}")
            return
        self.log(
            f"shortcut audit: a metadata-only baseline reaches test AUROC {report['metadata_auroc']:.3f} "
            f"(details: aidetect audit {shards})"
        )
        if report["warning"]:
            self.log(f"WARNING: {report['warning']}")
        self.tracker.summary({"audit/metadata_auroc": report["metadata_auroc"], "audit/warning": report["warning"]})

    def evaluate(self, loader: ShardLoader) -> Predictions:
        """Every rank's predictions on ``loader``'s split; ``Stopped`` at the next batch once a stop is agreed."""
        return evaluate(
            self.model,
            loader,
            self.info.device,
            self.precision,
            self.channels_last,
            stop_check(self.stop, loader, self.info.device),
        ).gather()

    def end_epoch(self, epoch: int, summary: dict[str, float]) -> None:
        """Validate the trained ``epoch``, log it, keep ``best.pt`` and ``last.pt``. A stop during the validation
        saves ``last.pt`` with the epoch trained and its validation pending, and raises ``Stopped``."""
        config = self.config
        self.log(f"epoch {epoch + 1}: validating, {len(self.loaders['val'])} batches per process")
        try:
            predictions = self.evaluate(self.loaders["val"])
        except Stopped:
            self.state.epoch, self.state.pending = epoch, summary
            self.leave(f"in the validation of epoch {epoch + 1} (epoch trained, validation pending)")
        metrics = compute_metrics(predictions)
        train_loss = summary["train_loss"]
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": summary["img_per_s"],
            "val": metrics,
        }
        self.state.history.append(row)
        self.state.epoch, self.state.batch, self.state.pending = epoch + 1, 0, None
        value, best = metrics[config.train.best_metric], self.state.best
        improved = is_better(config.train.best_metric, value, best.get("value"), metrics["loss"], best.get("loss"))
        if improved:
            self.state.best = {
                "metric": config.train.best_metric,
                "value": value,
                "epoch": epoch + 1,
                "loss": metrics["loss"],
                "threshold": val_threshold(predictions),
            }
        if self.info.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log_evaluation("val", metrics, self.state.step)
            self.tracker.log({"epoch": epoch + 1, "train/epoch_loss": train_loss}, self.state.step)
        self.log(
            f"epoch {epoch + 1}/{config.train.epochs}: train loss {train_loss:.4f}, val loss "
            f"{metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}, auroc {metrics['auroc']:.4f}"
            f"{' (best)' if improved else ''}"
        )
        self.draw_curves(final=epoch + 1 == config.train.epochs)
        if improved:  # with the temperature that calibrates this epoch's validation predictions
            self.save("best.pt", fit_temperature(predictions.logits, predictions.labels))
        self.save("last.pt")

    def draw_curves(self, final: bool) -> None:
        """Rank 0 redraws curves.png from the history when ``final`` (the last epoch, a stop) or when
        ``CURVES_EVERY_S`` seconds passed since it was last drawn (or since the start): every epoch for epochs
        that long, once at the end for a run of short ones (a probe on cached features). No history: nothing."""
        if not self.info.is_main or not self.state.history:
            return
        if final or time.monotonic() - self.curves_drawn >= CURVES_EVERY_S:
            plots.training_curves(self.state.history, self.out / "curves.png")
            self.curves_drawn = time.monotonic()

    def test(self) -> dict[str, Any]:
        """Evaluate the best checkpoint (never the last epoch's weights) on the test split: test_metrics.json,
        its plots and the per-image scores, scores_test.parquet (``aidetect.scores``)."""
        barrier()
        best = load_checkpoint(self.out / "best.pt")
        unwrap(self.model).load_state_dict(best.model)
        with self.make_loader("test") as loader, self.stop.deferred():
            predictions = self.evaluate(loader)
        chosen = best.state.best
        threshold = chosen.get("threshold", 0.5)  # checkpoints made before thresholds were chosen
        at_threshold = compute_metrics(predictions, threshold)
        metrics = report_metrics(predictions, temperature=best.temperature) | {
            "best_epoch": chosen["epoch"],
            "val_threshold": threshold,
            "accuracy_at_val_threshold": at_threshold["accuracy"],
            "balanced_accuracy_at_val_threshold": at_threshold["balanced_accuracy"],
        }
        if self.info.is_main:
            atomic_write_json(self.out / "test_metrics.json", metrics)
            test_splits = self.splits["test"].splits
            save_scores(self.out, predictions, self.out / "best.pt", best, self.shards, test_splits, "test")
            paths = plots.report_plots(predictions, metrics, self.out, "test")
            self.tracker.log_evaluation("test", metrics, self.state.step, misclassified(self.shards, predictions))
            self.tracker.log_plots("test", paths, self.state.step)
            self.tracker.summary({f"test/{k}": v for k, v in metrics.items()})
            self.log(
                f"test (best epoch {metrics['best_epoch']}): accuracy {metrics['accuracy']:.4f} "
                f"({metrics['accuracy_at_val_threshold']:.4f} at the validation threshold "
                f"{metrics['val_threshold']:.3f}), balanced {metrics['balanced_accuracy']:.4f}, "
                f"auroc {metrics['auroc']:.4f}, f1 {metrics['f1']:.4f} -> {self.out / 'test_metrics.json'}"
            )
            self.log(format_calibration_line(metrics))
            for line in format_per_source(metrics["per_source"]).splitlines() if "per_source" in metrics else ():
                self.log(line)
        self.tracker.finish()
        return metrics

    def save(self, name: str, temperature: float | None = None) -> None:
        """Every rank contributes its RNG state; rank 0 writes the file atomically (with ``temperature``: the
        calibration of best.pt)."""
        rngs = all_gather_objects(rng_state())
        if self.info.is_main:
            checkpoint = Checkpoint(
                model=unwrap(self.model).state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                state=self.state,
                rng=rngs,
                config=self.config,
                preprocess=self.manifest["settings"] | {"crop": self.crop},
                wandb_id=self.tracker.run_id,
                temperature=temperature,
                weights_sha256=getattr(getattr(self.model, "weights", None), "sha256", None),
            )
            save_checkpoint(self.out / name, checkpoint)
        barrier()

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(f"[aidetect] {message}", flush=True)


def progress_style(is_main: bool) -> ProgressStyle:
    """Rank 0 shows a bar on a terminal and plain lines in a log file (SLURM); the other ranks nothing."""
    if not is_main:
        return "none"
    return "bar" if sys.stderr.isatty() else "lines"


def ranks_by_host(hostnames: list[str]) -> str:
    """``node1: 0,1; node2: 2,3`` from every rank's hostname (in rank order): where the job really ran."""
    hosts: dict[str, list[int]] = {}
    for rank, host in enumerate(hostnames):
        hosts.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: {','.join(map(str, ranks))}" for host, ranks in hosts.items())


def augmentation(data: DataConfig) -> Augmentation | None:
    """The configured training augmentation, or None when it is off."""
    chosen = Augmentation(data.blur_prob, tuple(data.blur_sigma), data.jpeg_prob, tuple(data.jpeg_quality))
    return chosen if chosen.enabled else None


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def check_inputs(config: Config, shards: str, device: torch.device) -> None:
    """``UserError`` for a held-out, train or test source that pack ``shards`` lacks, or GPU decoding without a
    CUDA device."""
    if config.data.holdout_source:
        check_holdout(shards, config.data.holdout_source)
    for what in ("train_sources", "test_sources"):
        if getattr(config.data, what):
            check_sources(shards, getattr(config.data, what), f"data.{what}")
    if config.data.decode == "gpu" and device.type != "cuda":
        raise UserError(f"data.decode gpu needs a CUDA device; this process runs on {device}: set cpu")
    if config.data.features:
        check_cache(config, shards)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, only deterministic kernels. On CUDA these need
    cuBLAS's fixed workspace in the environment before the process's first CUDA work: ``aidetect train``
    and submitted jobs set it where they start (``hardware.set_cuda_environment``), a program calling
    ``train()`` itself must too; a one-line ``UserError`` otherwise."""
    variable, value = DETERMINISTIC_CUBLAS
    if deterministic and device.type == "cuda" and variable not in os.environ:
        raise UserError(f"train.deterministic on CUDA needs {variable}={value} set before CUDA starts")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_split_loader(config: Config, info: DistInfo, shards: str, selection: Selection, train: bool) -> ShardLoader:
    """This process's loader of ``selection`` of pack ``shards``; ``train``: the training loader (shuffled per
    epoch, grouped by ``optim.accumulate``, with noise and augmentation), else an evaluation one; with
    ``data.features``, the same batches of cached features (``probe.features_loader``)."""
    if config.data.features:
        return features_loader(config, info, shards, selection, train)
    data = config.data
    preprocess = models.preprocess_of(config.model.name, config.model.input_size)
    return build_loader(
        shards,
        selection.splits,
        batch_size=data.batch_size,
        train=train,
        crop=run_crop(config, shards),
        num_workers=data.workers,
        seed=config.train.seed,
        rank=info.rank,
        world=info.world,
        device=info.device,
        noise_std=data.noise_std if train else 0.0,
        accumulate=config.optim.accumulate if train else 1,
        keep=selection.keep,
        degrade=augmentation(data) if train else None,
        decode_on_device=data.decode == "gpu",
        mean=preprocess.mean,
        std=preprocess.std,
    )


def run_crop(config: Config, shards: str) -> int | None:
    """The side a run reads pack ``shards`` at: a fixed-size backbone's input side (``models.preprocess_of``),
    else ``data.crop`` (None: the pack's size). A one-line ``UserError`` when the pack's images are smaller
    than that side, or ``data.crop`` asks for another."""
    side = models.preprocess_of(config.model.name, config.model.input_size).side
    if side is None:
        return config.data.crop
    size, name = read_manifest(shards)["settings"]["size"], config.model.name
    if size < side:
        raise UserError(
            f"{config.data.shards}: packed at {size} px, under the {side} px input side of {name}; "
            f"repack it with --size {side}, or set model.input_size={size}"
        )
    if config.data.crop not in (None, side):
        raise UserError(
            f"data.crop {config.data.crop}: {name} reads {side} px inputs; leave data.crop unset or set "
            f"model.input_size={config.data.crop}"
        )
    return side


def build_trained_model(config: ModelConfig, image_size: int, device: torch.device) -> nn.Module:
    """The configured network for ``image_size`` inputs on ``device``, channels-last when so configured, with
    its pretrained weights and the parts ``model.tune`` freezes frozen."""
    tuning = Tuning(config.tune, config.lora_rank, config.lora_alpha)
    model = models.build_model(config.name, image_size, config.pretrained, tuning).to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser of ``model``'s trainable parameters (``momentum`` for sgd only); a one-line
    ``UserError`` for a name that is not one of ``config.CHOICES["optim.name"]``."""
    check_choice("optim.name", optim.name)
    momentum = {"momentum": optim.momentum} if optim.name == "sgd" else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[optim.name](trainable, lr=optim.lr, weight_decay=optim.weight_decay, **momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate's factor at each optimiser step (``optim.accumulate`` batches): a linear warmup
    over ``schedule.warmup_epochs``, then ``SCHEDULES[schedule.name]``; a one-line ``UserError`` for a name
    that is not one of ``config.CHOICES["schedule.name"]``."""
    check_choice("schedule.name", config.schedule.name)
    steps_per_epoch = math.ceil(batches_per_epoch / config.optim.accumulate)
    warmup = round(config.schedule.warmup_epochs * steps_per_epoch)
    after = SCHEDULES[config.schedule.name](config, steps_per_epoch, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else after(step)
    )


def multistep(config: Config, steps_per_epoch: int, warmup: int) -> Callable[[int], float]:
    """Times ``schedule.gamma`` at each of ``schedule.milestones`` (epochs): the original recipe."""
    milestones = [m * steps_per_epoch for m in config.schedule.milestones]
    return lambda step: config.schedule.gamma ** sum(step >= m for m in milestones)


def cosine(config: Config, steps_per_epoch: int, warmup: int) -> Callable[[int], float]:
    """Half a cosine from 1 after the warmup down to ``schedule.min_lr / optim.lr`` at the run's last step."""
    total = max(config.train.epochs * steps_per_epoch, 1)
    floor = config.schedule.min_lr / config.optim.lr

    def factor(step: int) -> float:
        progress = (step - warmup) / max(total - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def constant(config: Config, steps_per_epoch: int, warmup: int) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULES: dict[str, Callable[[Config, int, int], Callable[[int], float]]] = {
    "multistep": multistep,
    "cosine": cosine,
    "constant": constant,
}


def misclassified(shards: str, predictions: Predictions, limit: int = 16) -> list[tuple[Any, str]]:
    """Up to ``limit`` misclassified test images with captions, read back from the test shards."""
    from aidetect.data.manifest import select_shards
    from aidetect.data.shardfile import sample_images
    from aidetect.data.stored import decode_stored

    wrong = {
        k: (p, y)
        for k, p, y in zip(predictions.keys, predictions.probabilities, predictions.labels, strict=True)
        if (p >= 0.5) != (y == 1)
    }
    found = []
    for shard in select_shards(shards, ["test"]):
        for sample, stored in sample_images(shard.path):
            if sample.key in wrong and len(found) < limit:
                probability, label = wrong[sample.key]
                caption = f"{'fake' if label else 'real'} predicted p(fake)={probability:.2f}"
                found.append((decode_stored(stored), caption))
    return found
