"""One training epoch and one evaluation pass, for one process of a (possibly) distributed run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from aidetect.data.loader import ShardLoader
from aidetect.metrics import Predictions
from aidetect.preemption import Stopped, StopRequest

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a resolved precision (``aidetect.hardware.resolve_precision``); none for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class Stepper:
    """What one optimisation step needs besides the batch."""

    model: nn.Module  # DDP-wrapped (and compiled) when so configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    accumulate: int
    clip_grad: float | None
    channels_last: bool


@dataclass
class EpochResult:
    loss: float
    batches: int  # batches run in this call (fewer than the epoch's when stopped)
    images: int
    seconds: float
    stopped: bool  # a stop was requested (preemption): the epoch is not complete


def train_one_epoch(
    stepper: Stepper,
    loader: ShardLoader,
    start_batch: int,
    should_stop: Callable[[int], bool],
    on_step: Callable[[int, torch.Tensor, int], None],
) -> EpochResult:
    """Train over the loader's remaining batches. ``should_stop(batch index)`` is asked after every
    optimiser step; ``on_step(batch index, loss tensor, images)`` reports progress. Neither forces a
    device sync unless it reads the loss, so the loop keeps the GPU queue full."""
    model, criterion = stepper.model, nn.BCEWithLogitsLoss()
    model.train()
    loss_sum, batches, images, started = torch.zeros((), device=stepper.device), 0, 0, time.perf_counter()
    total = start_batch + len(loader)
    for index, batch in enumerate(loader, start=start_batch):
        inputs = batch.images.contiguous(memory_format=torch.channels_last) if stepper.channels_last else batch.images
        boundary = (index + 1) % stepper.accumulate == 0 or index + 1 == total
        sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(stepper.device, stepper.precision):
                loss = criterion(model(inputs).float(), batch.labels)
            stepper.scaler.scale(loss / stepper.accumulate).backward()
        if boundary:
            optimizer_step(stepper)
        loss_sum += loss.detach()
        batches += 1
        images += len(batch.keys)
        on_step(index, loss.detach(), len(batch.keys))
        if boundary and should_stop(index):
            return EpochResult(loss_sum.item() / batches, batches, images, time.perf_counter() - started, True)
    return EpochResult(loss_sum.item() / max(batches, 1), batches, images, time.perf_counter() - started, False)


def optimizer_step(stepper: Stepper) -> None:
    if stepper.clip_grad:
        stepper.scaler.unscale_(stepper.optimizer)
        nn.utils.clip_grad_norm_(stepper.model.parameters(), stepper.clip_grad)
    stepper.scaler.step(stepper.optimizer)
    stepper.scaler.update()
    stepper.optimizer.zero_grad(set_to_none=True)
    stepper.scheduler.step()


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
