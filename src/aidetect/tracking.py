"""wandb logging that can never fail a training run, and never records a secret.

Mode: ``wandb.mode`` in the config, else ``WANDB_MODE``, else online when an API key is configured and
offline otherwise (compute nodes often have no internet: sync later with ``wandb sync``). Any wandb
error is reported once and logging stops; training goes on.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from aidetect.config import Config, to_dict


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(config: Config) -> str:
    return config.wandb.mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def close_quietly() -> None:
    """Tear wandb down now, ignoring errors, so that its exit hook has nothing left to fail on. Its service
    process shuts down on the SIGTERM SLURM sends to every process of a job step, and the hook would then
    print a traceback after our checkpoint line."""
    with contextlib.suppress(Exception):  # ImportError included: a failed import is what brought us here
        import wandb

        wandb.teardown()


class Tracker:
    """A wandb run on rank 0 (``enabled=False`` elsewhere): every call is a no-op once anything fails."""

    def __init__(self, config: Config, run_dir: Path, run_id: str | None, enabled: bool) -> None:
        self.run = None
        self.run_id = run_id
        self.mode = resolve_mode(config)
        if not enabled or self.mode == "disabled":
            return
        self.guard(self.start, config, run_dir)

    def start(self, config: Config, run_dir: Path) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", disable_git=True)
        self.run = wandb.init(
            project=config.wandb.project,
            entity=config.wandb.entity,
            group=config.wandb.group,
            job_type=config.wandb.job_type,
            tags=config.wandb.tags,
            name=config.wandb.name,
            config=to_dict(config),
            dir=str(run_dir),
            mode=self.mode,
            id=self.run_id or uuid.uuid4().hex[:12],
            resume="allow",
            settings=settings,
        )
        self.run_id = self.run.id

    def guard(self, function: Any, *args: Any) -> None:
        if self.run is None and function != self.start:
            return
        try:
            function(*args)
        except Exception as exc:  # wandb must never end a training run
            print(f"aidetect: wandb disabled after an error: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.run = None
            close_quietly()

    def log(self, values: dict[str, Any], step: int) -> None:
        self.guard(lambda: self.run.log(values, step=step))

    def log_evaluation(self, prefix: str, metrics: dict, step: int, images: list[tuple[Any, str]] = ()) -> None:
        def log() -> None:
            import wandb

            table = wandb.Table(
                columns=["true \\ predicted", "real", "fake"],
                data=[["real", metrics["tn"], metrics["fp"]], ["fake", metrics["fn"], metrics["tp"]]],
            )
            values = {f"{prefix}/{k}": v for k, v in metrics.items()} | {f"{prefix}/confusion": table}
            if images:
                values[f"{prefix}/misclassified"] = [wandb.Image(image, caption=caption) for image, caption in images]
            self.run.log(values, step=step)

        self.guard(log)

    def log_plots(self, prefix: str, paths: dict[str, Path], step: int) -> None:
        def log() -> None:
            import wandb

            self.run.log({f"{prefix}/{name}": wandb.Image(str(path)) for name, path in paths.items()}, step=step)

        self.guard(log)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        def log() -> None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

        self.guard(log)

    def summary(self, values: dict[str, Any]) -> None:
        self.guard(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        self.guard(lambda: self.run.finish())
        self.run = None
