"""``aidetect submit train|cv|features``: submitit jobs on SLURM (or local processes), kept apart from training.

A job runs ``aidetect.train.train`` unchanged, with the distributed environment taken from submitit
(``TorchDistributedEnvironment``) and ``train.resume: auto``. Before a time limit or preemption SLURM
signals the tasks (``--signal=USR2@signal_delay_s``); training stops at a step all ranks agree on,
saves ``last.pt`` with its position, and rank 0 requeues the job (up to ``max_requeues`` times),
which resumes from there. Cross-validation submits the folds as one job array that runs in parallel;
leave-one-source-out (``--by source``) submits one task per fake source of the pack the same way, and
the chronological protocol (``--by time``) one task per window of generators by release date. A feature
extraction job (``submit features``) runs ``aidetect.features.extract_features`` the same way; with
``--features`` (``data.features``) every run of a cross-validation trains a probe on that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit
import torch

from aidetect.allocator import keep_freed_memory
from aidetect.cluster.profiles import Profile, node_memory_gb, place, require_account, setup_lines
from aidetect.cluster.requeue import earlier_attempts, refused, request_requeue, requeue_allowed
from aidetect.config import Config, DataConfig, build, to_dict, validate
from aidetect.data.manifest import chrono_windows, fake_sources
from aidetect.errors import UserError
from aidetect.fileio import atomic_write_json
from aidetect.hardware import set_cuda_environment
from aidetect.preemption import Outcome, Stopped, requeue_decision

JOBS_FILE = "jobs.json"


class TrainJob(submitit.helpers.Checkpointable):
    """What runs in every task of a job: ``train(config)``; requeues itself when stopped by a signal."""

    def __init__(self, max_requeues: int) -> None:
        self.max_requeues = max_requeues

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        keep_freed_memory()  # this process starts here, not in aidetect.cli.main
        set_cuda_environment(config["train"]["deterministic"])  # before any CUDA work, as aidetect.cli's train
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # one task's share of the node, not every core
            torch.set_num_threads(int(cpus))
        try:
            return self.run(build(Config, config, ""))
        except UserError:
            raise  # bad input fails again: never requeued
        except Exception as exc:
            status = exc.exit_code if isinstance(exc, Outcome) else 1
            if not isinstance(exc, Outcome):
                traceback.print_exc()  # why this attempt crashed, in the task's log
            if self.requeue(environment, status, any_rank=not isinstance(exc, Stopped)):
                # The job is back in the queue and SLURM is about to end this attempt: leave at once, so that
                # submitit records no result (it would read as a failure) and no DataLoader worker outlives
                # us, with the status that SLURM's record of this attempt then holds (the rule reads it).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
            raise

    def run(self, config: Config) -> dict[str, Any]:
        from aidetect.train import train

        return train(config)

    def requeue(self, environment: submitit.JobEnvironment, status: int, any_rank: bool) -> bool:
        """Put the job back in the queue when the rule of ``aidetect.preemption`` says so; False: not requeued.
        After a stop signal every rank is alive and rank 0 requeues for all; after a failure (a rank or node
        lost) any survivor may be the one left, so each asks SLURM, which requeues a running job once.
        ``UserError`` when SLURM refuses (a job submitted without requeue): the job fails, never completes."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id is None:
            return False  # submitit's local executor: nothing to requeue into
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        decision = requeue_decision(status, restarts, self.max_requeues, earlier_attempts(job_id))
        if not decision.requeue or (environment.global_rank != 0 and not any_rank):
            return decision.requeue
        print(f"[aidetect] job {job_id}: {decision.reason}", flush=True)
        reason = request_requeue(job_id)
        if reason is None or (any_rank and requeue_allowed(job_id)):  # allowed: another survivor came first
            return True
        raise UserError(refused(job_id, reason)) from None

    def checkpoint(self, config: dict[str, Any]) -> submitit.helpers.DelayedSubmission:
        """submitit's own timeout path (a signal before training started): resubmit as is; resume is auto."""
        return submitit.helpers.DelayedSubmission(self, config)


class FeaturesJob(TrainJob):
    """What runs in every task of a feature extraction job (``submit features``): ``extract_features`` into
    ``train.out``, requeued as training is when stopped by a signal (the rerun skips the shards written)."""

    def __init__(self, max_requeues: int, layers: tuple[int, ...]) -> None:
        super().__init__(max_requeues)
        self.layers = layers

    def run(self, config: Config) -> dict[str, Any]:
        from aidetect.features import extract_features

        return extract_features(config, config.train.out, self.layers)


def make_executor(profile: Profile, folder: Path, nodes: int, tasks_per_node: int, name: str) -> submitit.Executor:
    cluster = "local" if profile.executor == "local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    parameters: dict[str, Any] = {
        "name": name,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "timeout_min": profile.time_limit_min,
    }
    if profile.gpus_per_node:
        parameters["gpus_per_node"] = profile.gpus_per_node
    memory = node_memory_gb(profile)
    if memory:
        parameters["mem_gb"] = memory * nodes if cluster == "local" else memory
    if cluster == "slurm":
        parameters |= {
            "slurm_partition": profile.partition,
            "slurm_signal_delay_s": profile.signal_delay_s,
            "slurm_setup": setup_lines(profile),
            "slurm_additional_parameters": {"requeue": True}
            | ({"account": profile.account} if profile.account else {}),
        }
        if profile.constraint:
            parameters["slurm_constraint"] = profile.constraint
    executor.update_parameters(**parameters)
    return executor


def prepare(config: Config, profile: Profile) -> Config:
    require_account(profile)
    config = place(config, profile)
    if profile.wandb_mode and config.wandb.mode is None:
        config = replace(config, wandb=replace(config.wandb, mode=profile.wandb_mode))
    config = replace(config, train=replace(config.train, resume="auto"))
    validate(config)  # a missing data path fails here, not hours later in the queue
    return config


def submit_train(config: Config, profile: Profile, nodes: int, tasks_per_node: int) -> list[submitit.Job]:
    config = prepare(config, profile)
    run = Path(config.train.out)
    run.mkdir(parents=True, exist_ok=True)
    executor = make_executor(profile, run / "submitit", nodes, tasks_per_node, f"aidetect-{run.name}")
    job = executor.submit(TrainJob(profile.max_requeues), to_dict(config))
    record(run, "train", [job], profile)
    return [job]


def submit_features(
    config: Config, profile: Profile, nodes: int, tasks_per_node: int, layers: tuple[int, ...]
) -> list[submitit.Job]:
    """One job extracting the feature cache of ``config`` (``aidetect features``) into ``train.out``, its
    shards spread over every task of the job."""
    config = prepare(config, profile)
    out = Path(config.train.out)
    out.mkdir(parents=True, exist_ok=True)
    executor = make_executor(profile, out / "submitit", nodes, tasks_per_node, f"aidetect-features-{out.name}")
    job = executor.submit(FeaturesJob(profile.max_requeues, layers), to_dict(config))
    record(out, "features", [job], profile)
    return [job]


def submit_cv(config: Config, profile: Profile, folds: int, nodes: int, tasks_per_node: int) -> list[submitit.Job]:
    """One job array, one task per fold (RUN/foldK, job_type fold-K), run in parallel."""
    config = prepare(config, profile)
    members = [(f"fold{k}", f"fold-{k}", replace(config.data, fold=k)) for k in range(folds)]
    return submit_array(config, profile, members, nodes, tasks_per_node, by="fold", folds=folds)


def submit_holdout(config: Config, profile: Profile, nodes: int, tasks_per_node: int) -> list[submitit.Job]:
    """Leave-one-source-out: one job array, one task per fake source S of the pack (sorted), training with
    ``data.holdout_source`` = S (validation fold as configured) in ``RUN/holdout_folder(S)``, job_type the
    folder's name. jobs.json records ``by: source`` and ``sources`` ({source: folder}). ``UserError`` when
    the pack has fewer than 2 fake sources or the config already holds one out."""
    config = prepare(config, profile)
    if config.data.holdout_source:
        raise UserError("data.holdout_source is set: --by source holds out each fake source in turn; unset it")
    folders = {source: holdout_folder(source) for source in holdout_sources(config.data.shards)}
    members = [(folder, folder, replace(config.data, holdout_source=source)) for source, folder in folders.items()]
    return submit_array(config, profile, members, nodes, tasks_per_node, by="source", sources=folders)


def submit_chrono(
    config: Config, profile: Profile, nodes: int, tasks_per_node: int, window: int = 1
) -> list[submitit.Job]:
    """The chronological protocol: the pack's fake sources by release date in windows of ``window``
    (``chrono_windows``), and one job array with one task per window but the last: task i trains on the
    generators of windows 0..i (``data.train_sources``, validation fold as configured) and tests on those
    of every later window, i+1 to the last (``data.test_sources``), in ``RUN/time_folder(i)``, job_type the
    folder's name (cv-report cuts its scores into one cell per later window). jobs.json
    records ``by: time``, ``window`` and ``windows``. ``UserError`` when a fake source has no date, there
    are fewer than 2 windows, or the config already chooses sources."""
    config = prepare(config, profile)
    data = config.data
    if data.holdout_source or data.train_sources is not None or data.test_sources is not None:
        raise UserError("--by time chooses each task's sources: unset data.holdout_source/train_sources/test_sources")
    windows = chrono_windows(data.shards, window)
    members = [(time_folder(i), time_folder(i), chrono_data(data, windows, i)) for i in range(len(windows) - 1)]
    return submit_array(config, profile, members, nodes, tasks_per_node, by="time", window=window, windows=windows)


def chrono_data(data: DataConfig, windows: list[list[str]], task: int) -> DataConfig:
    """``data`` for chronological task ``task``: train on windows 0..task, test on every later window."""
    trained = [source for chosen in windows[: task + 1] for source in chosen]
    tested = [source for chosen in windows[task + 1 :] for source in chosen]
    return replace(data, train_sources=trained, test_sources=tested)


def time_folder(task: int) -> str:
    """The sub-folder of chronological task ``task``: trained on windows 0..task, tested on every later one."""
    return f"time-{task}"


def time_task(index: int, config: Config, window: int) -> tuple[str, DataConfig]:
    """(folder, data config) of array task ``index`` of a chronological sbatch array (``aidetect time-task``,
    run by slurm/cv.sbatch): as ``submit_chrono``'s task ``index`` on the pack that ``config`` trains on."""
    validate(config)
    windows = chrono_windows(config.data.shards, window)
    if not 0 <= index < len(windows) - 1:
        raise UserError(
            f"array task {index}: {config.data.shards} has windows 0..{len(windows) - 1}, tasks 0..{len(windows) - 2}"
        )
    return time_folder(index), chrono_data(config.data, windows, index)


def submit_array(
    config: Config,
    profile: Profile,
    members: list[tuple[str, str, DataConfig]],
    nodes: int,
    tasks_per_node: int,
    **extra: Any,
) -> list[submitit.Job]:
    """One task per member ``(folder, job_type, data config)`` training in ``RUN/folder``, all in one wandb
    group (the run's name unless set), as one job array that runs in parallel; ``extra`` goes to jobs.json."""
    run = Path(config.train.out)
    run.mkdir(parents=True, exist_ok=True)
    group = config.wandb.group or run.name
    configs = [
        to_dict(
            replace(
                config,
                data=data,
                train=replace(config.train, out=str(run / folder)),
                wandb=replace(config.wandb, group=group, job_type=job_type, name=f"{group}-{folder}"),
            )
        )
        for folder, job_type, data in members
    ]
    executor = make_executor(profile, run / "submitit", nodes, tasks_per_node, f"aidetect-cv-{run.name}")
    executor.update_parameters(slurm_array_parallelism=len(members))
    jobs = executor.map_array(TrainJob(profile.max_requeues), configs)
    record(run, "cv", jobs, profile, **extra)
    return jobs


def holdout_sources(shards: str | Path) -> list[str]:
    """``fake_sources`` of a pack for leave-one-source-out; ``UserError`` unless there are at least 2."""
    sources = fake_sources(shards)
    if len(sources) < 2:
        raise UserError(
            f"{shards}: leave-one-source-out needs at least 2 fake sources, the pack has {len(sources)} "
            f"({', '.join(sources) or 'none recorded'}); pack an ImageFolder with fake/SOURCE/ folders"
        )
    return sources


def holdout_folder(source: str) -> str:
    """The sub-folder of a leave-one-source-out run that holds ``source`` out: ``holdout-SOURCE`` for a plain
    name (up to 40 letters, digits, ``_ - .``, not starting with a dot); otherwise a slug of it plus a hash of
    the name, so that any name gives a safe folder, distinct names distinct folders, and a wandb job_type
    (the folder's name) stays under wandb's 64 characters."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,39}", source):
        return f"holdout-{source}"
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", source)[:24]
    return f"holdout-{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def record(run: Path, kind: str, jobs: list[submitit.Job], profile: Profile, **extra: Any) -> None:
    """Job ids, the submission script and log paths, in the run folder and on the terminal."""
    entries = [{"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)} for job in jobs]
    submission = str(jobs[0].paths.submission_file) if profile.executor == "slurm" else None
    atomic_write_json(
        run / JOBS_FILE,
        {
            "kind": kind,
            "profile": profile.name,
            "executor": profile.executor,
            "submitted_at": time.time(),
            "sbatch": f"sbatch {submission}" if submission else None,
            "jobs": entries,
            **extra,
        },
    )
    print(f"[aidetect] submitted {kind} on {profile.name} ({profile.executor}): {len(jobs)} job(s)")
    if submission:
        print(f"  sbatch script: {submission}")
    for entry in entries:
        print(f"  job {entry['job_id']}: log {entry['stdout']}")
    print(f"  status: aidetect status {run}")


def wait(jobs: list[submitit.Job], poll_s: float = 5.0) -> bool:
    """Block until every job ends, printing state changes; True when all completed."""
    last: dict[str, str] = {}
    while True:
        for job in jobs:
            state = job.state
            if last.get(job.job_id) != state:
                print(f"[aidetect] job {job.job_id}: {state}", flush=True)
                last[job.job_id] = state
        if all(job.done() for job in jobs):
            break
        time.sleep(poll_s)
    failed = []
    for job in jobs:
        try:
            job.results()  # one per task: a multi-node job has several
        except Exception as exc:  # the job's own traceback is in its log
            failed.append(f"{job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
    for line in failed:
        print(f"[aidetect] job {line}; see its log", file=sys.stderr)
    return not failed


def load_jobs(run: Path) -> dict[str, Any]:
    path = run / JOBS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run} a run folder made by 'aidetect submit'?")
    return json.loads(path.read_text())


def holdout_task(index: int, config: Config) -> tuple[str, str]:
    """(folder, source) that array task ``index`` of a leave-one-source-out sbatch array holds out
    (``aidetect holdout-task``, run by slurm/cv.sbatch): the ``index``-th fake source (sorted) of the pack
    that ``config`` trains on."""
    validate(config)
    sources = holdout_sources(config.data.shards)
    if not 0 <= index < len(sources):
        raise UserError(f"array task {index}: {config.data.shards} has fake sources 0..{len(sources) - 1}: {sources}")
    return holdout_folder(sources[index]), sources[index]
