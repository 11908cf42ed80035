"""One training epoch and one evaluation pass, for one process of a (possibly) distributed run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from aidetect.data.loader import ShardLoader
from aidetect.metrics import Predictions
from aidetect.preemption import Stopped, StopRequest
from aidetect.tracking import Tracker

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a resolved precision (``aidetect.hardware.resolve_precision``); none for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class TrainingParts:
    """What an optimisation step uses besides the batch: built once per run (``aidetect.train``)."""

    model: nn.Module  # DDP-wrapped (and compiled) when so configured
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimiser step
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    accumulate: int = 1  # batches per optimiser step
    clip: float | None = None  # the gradients' largest norm; None or 0: no clipping
    channels_last: bool = False  # the inputs' memory format (the model's is set where it is built)


@dataclass
class EpochResult:
    loss: float
    batches: int  # batches run in this call (fewer than the epoch's when stopped)
    images: int
    seconds: float
    stopped: bool  # a stop was requested (preemption): the epoch is not complete


ProgressStyle = Literal["bar", "lines", "none"]


class Progress:
    """What rank 0 shows of a training epoch: a tqdm bar on a terminal (``bar``), else a plain line at
    each report (``lines``: SLURM log files); ``none`` shows nothing (other ranks, benchmarks). It is
    given numbers only: each batch's images, and at each report the loss and the learning rate."""

    def __init__(self, epoch: int, start_batch: int, batches: int, world: int, style: ProgressStyle) -> None:
        self.epoch, self.total, self.world, self.style = epoch, start_batch + batches, world, style
        self.started, self.images, self.done = time.perf_counter(), 0, 0
        self.bar = tqdm(total=self.total, initial=start_batch, desc=f"epoch {epoch + 1}", disable=style != "bar")

    def advance(self, images: int) -> None:
        """One batch of ``images`` per process done."""
        self.images += images * self.world
        self.done += 1
        self.bar.update()

    def rate(self) -> float:
        """Images per second over every process, since the epoch (or this call of it) started."""
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def show(self, index: int, loss: float, lr: float, rate: float) -> None:
        if self.style == "bar":
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
        elif self.style == "lines":
            eta = (self.total - index - 1) * (time.perf_counter() - self.started) / self.done
            print(
                f"[aidetect] epoch {self.epoch + 1} batch {index + 1}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{rate:.0f} img/s eta {eta:.0f}s",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def train_one_epoch(
    parts: TrainingParts,
    loader: ShardLoader,
    progress: Progress,
    *,
    start_batch: int = 0,
    log_every: int,
    tracker: Tracker | None = None,
    stop: StopRequest | None = None,
) -> EpochResult:
    """Train on the loader's batches from ``start_batch`` to the epoch's end: one optimiser step per
    ``parts.accumulate`` batches and after the last. Every ``log_every`` batches the loss is read (the one
    device sync besides the stop check), shown and logged; at an optimiser step there, every rank agrees
    whether ``stop`` was requested, and on it all return ``stopped`` after the same step."""
    model, criterion = parts.model, nn.BCEWithLogitsLoss()
    model.train()
    loss_sum, batches, images, started = torch.zeros((), device=parts.device), 0, 0, time.perf_counter()
    total = start_batch + len(loader)
    for index, batch in enumerate(loader, start=start_batch):
        inputs = batch.images.contiguous(memory_format=torch.channels_last) if parts.channels_last else batch.images
        boundary = (index + 1) % parts.accumulate == 0 or index + 1 == total  # an optimiser step after it
        # DDP all-reduces the gradients at the optimiser step only; they add up locally before it.
        sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(parts.device, parts.precision):
                loss = criterion(model(inputs).float(), batch.labels)
            parts.scaler.scale(loss / parts.accumulate).backward()
        if boundary:
            if parts.clip:
                parts.scaler.unscale_(parts.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), parts.clip)
            parts.scaler.step(parts.optimizer)  # skipped (fp16) when the gradients overflowed
            parts.scaler.update()
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scheduler.step()
        loss_sum += loss.detach()
        batches, images = batches + 1, images + len(batch.keys)
        progress.advance(len(batch.keys))
        if (index + 1) % log_every:
            continue
        rate, lr, value = progress.rate(), parts.optimizer.param_groups[0]["lr"], loss.item()
        if tracker is not None:
            tracker.log({"train/loss": value, "train/lr": lr, "train/img_per_s": rate}, parts.scheduler.last_epoch)
        progress.show(index, value, lr, rate)
        if boundary and stop is not None and stop_agreed(stop.requested, parts.device):
            return EpochResult(loss_sum.item() / batches, batches, images, time.perf_counter() - started, True)
    return EpochResult(loss_sum.item() / max(batches, 1), batches, images, time.perf_counter() - started, False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: ShardLoader,
    device: torch.device,
    precision: str,
    channels_last: bool,
    should_stop: Callable[[int], bool] | None = None,
) -> Predictions:
    """This rank's predictions on its share of the split, with the model in eval mode (BatchNorm uses its
    running statistics and does not update them). ``Predictions.gather()`` merges all ranks'. Raises
    ``Stopped`` before batch ``index`` when ``should_stop(index)`` (``stop_check``); nothing is saved."""
    model.eval()
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    predictions = Predictions()
    loader.set_epoch(0)
    for index, batch in enumerate(loader):
        if should_stop is not None and should_stop(index):
            raise Stopped("the evaluation was not finished and wrote nothing; run the same command again")
        inputs = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
        with autocast(device, precision):
            logits = model(inputs).float()
        predictions.loss_sum += criterion(logits, batch.labels).item()
        predictions.probabilities += torch.sigmoid(logits).tolist()
        predictions.logits += logits.tolist()
        predictions.labels += batch.labels.long().tolist()
        predictions.keys += batch.keys
        predictions.sources += batch.sources
    return predictions


def stop_check(stop: StopRequest, loader: ShardLoader, device: torch.device) -> Callable[[int], bool]:
    """``should_stop`` for ``evaluate``: asks every rank at each batch that all ranks have (their shares of a
    split differ by at most one batch), so that all stop at the same batch or none does. Call it inside
    ``stop.deferred()``: a stop that comes after the last common batch ends the section instead."""
    common = loader.batches_on_every_rank()
    return lambda index: index < common and stop_agreed(stop.requested, device)


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """True on every rank once any rank has been asked to stop, so that all stop at the same step."""
    if not dist.is_initialized():
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
