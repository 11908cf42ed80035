"""The ``aidetect`` command line: parses arguments and calls library functions, nothing more.

Errors the user can fix (``UserError``, bad arguments) end as one line on stderr and exit code 2.
Each command's options are added when that command is parsed (``OneLineErrorParser(arguments=...)``),
from the code they configure (``aidetect.options``): ``aidetect --help`` and the light commands load no
torch, and no default, help text or choice list is written twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aidetect.allocator import keep_freed_memory
from aidetect.errors import USER_ERROR_EXIT_CODE, UserError
from aidetect.options import DefaultsShown, defaults_of
from aidetect.preemption import Outcome

Arguments = Callable[[argparse.ArgumentParser], None]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of the usage block plus the error, shows
    every default in its help, and adds its arguments (``arguments(self)``) when it first parses."""

    def __init__(self, *args: Any, arguments: Arguments | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)
        self.arguments = arguments

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self.arguments:
            arguments, self.arguments = self.arguments, None
            arguments(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR_EXIT_CODE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before any big buffer: CPU steps would page-fault their activations in anew
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"aidetect: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except Outcome as outcome:  # stopped, a lost peer, out of memory: the exit code tells the requeue rule
        print(f"aidetect: {outcome.headline}; {outcome}", file=sys.stderr)
        return outcome.exit_code
    except KeyboardInterrupt:
        print("aidetect: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="aidetect", description="Train and evaluate detectors of AI-generated images, from a laptop to SLURM."
    )
    add_commands(
        parser,
        "command",
        {
            "synth": ("write a synthetic real/fake ImageFolder for demos and tests", synth_arguments),
            "pack": ("pack an image folder or list into WebDataset shards with fixed splits", pack_arguments),
            "audit": ("can file metadata alone tell fake from real? (shortcut check)", audit_arguments),
            "train": ("train a detector (1 process, torchrun or srun)", train_arguments),
            "features": ("a frozen backbone's features of a pack, for linear probes", features_arguments),
            "evaluate": ("metrics and plots of a checkpoint on a split of a pack", evaluate_arguments),
            "predict": ("probability that raw images are AI-generated, as CSV", predict_arguments),
            "export": ("a checkpoint's model as ONNX or TorchScript, uint8 images in, logits out", export_arguments),
            "demo": ("synthetic data -> pack -> train -> test metrics, minutes on a CPU", demo_arguments),
            "submit": ("submit training or cross-validation jobs with submitit", submit_arguments),
            "cv-report": (
                "cv_summary.json and plots from a cross-validation or leave-one-source-out run",
                cv_report_arguments,
            ),
            "status": ("state and progress of a submitted run or cross-validation", status_arguments),
            "wandb-sync": ("upload every offline wandb run under a run folder", wandb_sync_arguments),
            "weights": ("pretrained weights in the local Hugging Face cache, for offline nodes", weights_arguments),
            "doctor": ("check this node (or every rank of a job) before spending an allocation", doctor_arguments),
            "bench": ("benchmarks that print figures and write JSON", bench_arguments),
            "holdout-task": (
                "what array task INDEX of slurm/cv.sbatch (AIDETECT_CV_BY=source) holds out: FOLDER<tab>SOURCE",
                holdout_task_arguments,
            ),
            "time-task": (
                "what array task INDEX of slurm/cv.sbatch (AIDETECT_CV_BY=time) trains and tests on: "
                "FOLDER<tab>data.train_sources=[...]<tab>data.test_sources=[...]",
                time_task_arguments,
            ),
        },
    )
    return parser


def add_commands(parser: argparse.ArgumentParser, dest: str, commands: dict[str, tuple[str, Arguments]]) -> None:
    """Subcommands ``{name: (help, arguments)}`` of ``parser``, the name chosen stored as ``dest``."""
    group = parser.add_subparsers(dest=dest, required=True, parser_class=OneLineErrorParser)
    for name, (text, arguments) in commands.items():
        group.add_parser(name, help=text, arguments=arguments)


def add_workers(parser: argparse.ArgumentParser, what: str = "processes") -> None:
    parser.add_argument("--workers", type=int, default=None, help=f"{what} (default: all cores)")


def synth_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.data.synth import synth

    default = defaults_of(synth)
    parser.add_argument("out", help="output folder (new or empty)")
    parser.add_argument("--n", type=int, default=default["n"], help="number of images, half per class")
    parser.add_argument("--seed", type=int, default=default["seed"], help="seed of everything drawn")
    parser.add_argument("--defects", action="store_true", help="add the broken files scraped datasets hold")
    parser.add_argument("--min-side", type=int, default=default["min_side"], help="shortest image side in px")
    parser.add_argument("--max-side", type=int, default=default["max_side"], help="longest image side in px")
    parser.add_argument(
        "--sources",
        type=int,
        default=default["sources"],
        help="fake sources fake/gen1..genN, each its own upsampler; N >= 2 also splits reals into "
        "real/photo and real/art (N = 1: files straight in real/ and fake/)",
    )
    parser.add_argument(
        "--shortcuts",
        action="store_true",
        help="classes differ in file metadata as in some Kaggle sets: fakes PNG at 3 square sizes, "
        "reals JPEG of varied sizes, some with EXIF (default: both classes alike)",
    )
    parser.add_argument(
        "--fragile",
        action="store_true",
        help="a trace JPEG q50 all but destroys: strong fine grain on reals, a faint upsampler trace on fakes",
    )
    add_workers(parser)
    parser.set_defaults(handler=run_synth)


def pack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="a folder in ImageFolder (SRC/real, SRC/fake), Kaggle (SRC/{train,test}/...), GenImage "
        "(SRC/GENERATOR/{train,val}/{ai,nature}) or Synthbuster (SRC/RAISE, SRC/GENERATOR) layout, or a CSV list",
    )
    parser.add_argument("out", help="output folder for shards and manifest.json")
    add_pack_options(parser)
    add_workers(parser)
    parser.set_defaults(handler=run_pack)


def add_pack_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of ``PackSettings`` (``pack_settings`` reads them back)."""
    from aidetect.data.pack import PackSettings
    from aidetect.options import add_flags

    add_flags(parser, PackSettings)


def pack_settings(args: argparse.Namespace) -> Any:
    from aidetect.data.pack import PackSettings
    from aidetect.options import from_args

    return from_args(PackSettings, args)


def audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="pack folder")
    parser.add_argument("--out", default=None, help="folder for audit.json and audit.png (default: the pack folder)")
    parser.set_defaults(handler=run_audit)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """What ``aidetect train`` takes: the config options and ``--resume``."""
    from aidetect.config import add_config_options

    add_config_options(parser)
    parser.add_argument("--resume", default=None, help="'auto' (last.pt in the run folder) or a checkpoint path")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_options(parser)
    parser.set_defaults(handler=run_train)


def features_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.config import add_config_options

    add_config_options(parser)  # --out: the cache folder
    add_layers(parser)
    parser.set_defaults(handler=run_features)


def add_layers(parser: argparse.ArgumentParser) -> None:
    """``--layers`` of ``features`` and ``submit features`` (``parse_layers`` reads it back)."""
    parser.add_argument("--layers", help="also each of these ViT blocks' CLS token (1-based, e.g. 4,8,12)")


def parse_layers(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(",")) if text else ()
    except ValueError:
        raise UserError(f"--layers {text}: expected block numbers separated by commas, e.g. 4,8,12") from None


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.inference import evaluate
    from aidetect.scores import FORMATS

    default = defaults_of(evaluate)
    parser.add_argument("checkpoint", help="e.g. runs/NAME/best.pt")
    parser.add_argument("--data", required=True, help="pack folder")
    parser.add_argument("--split", default=default["split"], help="test, fold0, ...")
    parser.add_argument(
        "--out", default=None, help="folder for eval_SPLIT.json, robustness.json and plots (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="images per step")
    parser.add_argument(
        "--perturb",
        nargs="+",
        metavar="KIND[:S,..]",
        help="robustness sweep of both classes on the stored images: none, jpeg:Q,.. (quality), blur:SIGMA,.. "
        "(px), downscale:F,.. (factor < 1), e.g. jpeg:95,75,50,30 blur:1,2,3 downscale:0.5,0.25; after the "
        "clean evaluation, one per strength -> robustness.json, robustness.png",
    )
    parser.add_argument(
        "--scores-format",
        choices=FORMATS,
        default=default["scores_format"],
        help="file of the per-image scores, scores_SPLIT.FORMAT",
    )
    add_crops(parser, default)
    parser.set_defaults(handler=run_evaluate)


def add_crops(parser: argparse.ArgumentParser, default: dict[str, Any]) -> None:
    """``--crops`` and ``--combine`` of evaluate and predict, defaulting as ``default`` (their keywords) say."""
    from aidetect.scores import COMBINE

    parser.add_argument(
        "--crops",
        type=int,
        default=default["crops"],
        help="crops of the model's side tiled over each stored image (native packs), their logits combined",
    )
    parser.add_argument("--combine", choices=COMBINE, default=default["combine"], help="of each image's crop logits")


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.inference import predict

    parser.add_argument("checkpoint", help="e.g. runs/NAME/best.pt")
    parser.add_argument("paths", nargs="+", help="image files or folders")
    parser.add_argument("--csv", default="predictions.csv", help="output CSV")
    parser.add_argument(
        "--perturb",
        metavar="KIND:S",
        help="degrade each file before preprocessing: one of jpeg:Q, blur:SIGMA, downscale:F (e.g. jpeg:50)",
    )
    parser.add_argument(
        "--unsure",
        metavar="LO,HI",
        help="label 'unsure' every file whose (calibrated) probability of fake lies in [LO, HI], e.g. 0.4,0.6",
    )
    add_crops(parser, defaults_of(predict))
    parser.set_defaults(handler=run_predict)


def export_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.export import SUFFIXES

    parser.add_argument("checkpoint", help="e.g. runs/NAME/best.pt")
    parser.add_argument("--format", required=True, choices=list(SUFFIXES), help="file format")
    parser.add_argument("--out", default=None, help="file to write (default: the checkpoint's path, its suffix)")
    parser.set_defaults(handler=run_export)


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.demo import demo

    default = defaults_of(demo)
    parser.add_argument("--out", default=default["out"], help="folder for data, shards and the run")
    parser.add_argument("--n", type=int, default=default["n"], help="synthetic images")
    parser.add_argument("--sources", type=int, default=default["sources"], help="fake sources, as for synth")
    add_workers(parser)
    parser.set_defaults(handler=run_demo)


def submit_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(
        parser,
        "job",
        {
            "train": ("one training run", submit_train_arguments),
            "cv": ("K folds as one parallel job array", submit_cv_arguments),
            "features": ("a feature cache (aidetect features) as one job", submit_features_arguments),
        },
    )


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """What ``submit train`` and ``submit cv`` take first: the profile and its overrides, how to wait."""
    from aidetect.cluster.profiles import EXECUTORS

    parser.add_argument("--profile", required=True, help="cluster profile: hpc/NAME.yaml name or a YAML path")
    parser.add_argument("--executor", choices=EXECUTORS, help="override the profile's (local: no SLURM)")
    parser.add_argument("--account", help="SLURM account (overrides the profile's)")
    parser.add_argument("--partition", help="SLURM partition (overrides the profile's)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes per job")
    parser.add_argument("--gpus-per-node", type=int, help="overrides the profile's; one task per GPU")
    parser.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, else 1)")
    parser.add_argument("--time", type=int, help="time limit in minutes (jobs requeue themselves before it)")
    parser.add_argument("--wait", action="store_true", help="block until the jobs end; non-zero exit if any failed")


def submit_train_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.config import add_config_options

    add_job_options(parser)
    add_config_options(parser)
    parser.set_defaults(handler=run_submit)


def submit_features_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.config import add_config_options

    add_job_options(parser)
    add_config_options(parser)  # --out: the cache folder
    add_layers(parser)
    parser.set_defaults(handler=run_submit)


def submit_cv_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.cluster.submit import submit_chrono
    from aidetect.config import add_config_options
    from aidetect.data.pack import PackSettings

    add_job_options(parser)
    parser.add_argument(
        "--by",
        choices=("fold", "source", "time"),
        default="fold",
        help="fold: one job per fold; source: leave-one-source-out, one job per fake source of the pack, "
        "trained without it and tested on it (RUN/holdout-SOURCE); time: the pack's generators by release date "
        "in windows of --window, job i trained on windows 0..i and tested on each later window (RUN/time-i)",
    )
    window = defaults_of(submit_chrono)["window"]
    parser.add_argument("--window", type=int, help=f"generators per window, --by time only (default {window})")
    parser.add_argument(
        "--folds", type=int, help=f"folds to run, --by fold only (default {PackSettings.folds}; the pack's at most)"
    )
    add_config_options(parser)
    parser.set_defaults(handler=run_submit)


def cv_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the cv run folder (holding fold0/, fold1/, ... or holdout-SOURCE/, ...)")
    parser.set_defaults(handler=run_cv_report)


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder")
    parser.set_defaults(handler=run_status)


def wandb_sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder")
    parser.add_argument("--list", action="store_true", help="only list the offline runs")
    parser.set_defaults(handler=run_wandb_sync)


def weights_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(
        parser,
        "action",
        {"fetch": ("download weights into the local Hugging Face cache (needs internet)", weights_fetch_arguments)},
    )


def weights_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="timm:ARCH (timm's weights of it) or hf-hub:ORG/NAME")
    parser.set_defaults(handler=run_weights_fetch)


def doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="cluster profile: the GPUs it expects, runs_dir and wandb mode")
    parser.add_argument("--data", help="pack folder: every shard present with the manifest's size and sha256")
    parser.add_argument("--out", help="run folder whose file system must have room (default: the profile's runs_dir)")
    parser.set_defaults(handler=run_doctor)


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(
        parser,
        "bench",
        {
            "data": (
                "pack and loader throughput against decode floors and the naive pipeline",
                bench_data_arguments,
            ),
            "train": ("training-loop throughput vs a bare PyTorch loop, per precision", bench_train_arguments),
            "cv": ("K folds as a parallel job array vs one fold alone, on a cluster profile", bench_cv_arguments),
        },
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")


def bench_data_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.bench.data import bench_data

    default = defaults_of(bench_data)
    parser.add_argument("--src", required=True, help="raw ImageFolder")
    parser.add_argument("--shards", required=True, help="pack folder (packed from --src first if it holds none)")
    add_json(parser)
    add_workers(parser)
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="loader batch size")
    parser.add_argument(
        "--naive-limit", type=int, default=default["naive_limit"], help="images timed through the naive pipeline"
    )
    parser.add_argument(
        "--min-images", type=int, default=default["min_images"], help="images timed through the loader and its floor"
    )
    add_pack_options(parser)
    parser.set_defaults(handler=run_bench_data)


def bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.bench.train import bench_train
    from aidetect.hardware import PRECISIONS

    default = defaults_of(bench_train)
    add_json(parser)
    parser.add_argument("--model", default=default["model"], help="the architecture timed (model.name)")
    parser.add_argument("--image-size", type=int, default=default["image_size"], help="side of the input in px")
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="images per step")
    parser.add_argument("--steps", type=int, default=default["steps"], help="timed steps per setting")
    parser.add_argument(
        "--precisions",
        default=",".join(default["precisions"]),
        help=f"comma-separated: {', '.join(PRECISIONS)} (auto: what train.precision auto picks)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--data", default=None, help="pack folder: also time the loop fed by the training loader from it (loader_fed)"
    )
    add_workers(parser, "loader processes for --data")
    parser.set_defaults(handler=run_bench_train)


def bench_cv_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.config import add_config_options
    from aidetect.data.pack import PackSettings

    parser.add_argument("--profile", default="local", help="cluster profile (local: the local test cluster)")
    parser.add_argument("--folds", type=int, default=PackSettings.folds, help="folds run in parallel")
    add_json(parser)
    add_config_options(parser)
    parser.set_defaults(handler=run_bench_cv)


def holdout_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=int, help="the array task: the INDEX-th fake source of the pack, sorted")
    add_train_options(parser)
    parser.set_defaults(handler=run_holdout_task)


def time_task_arguments(parser: argparse.ArgumentParser) -> None:
    from aidetect.cluster.submit import submit_chrono

    parser.add_argument("index", type=int, help="the array task: trained on windows 0..INDEX, tested on the later ones")
    window = defaults_of(submit_chrono)["window"]
    parser.add_argument("--window", type=int, default=window, help="generators per window")
    add_train_options(parser)
    parser.set_defaults(handler=run_time_task)


def check_workers(workers: int | None) -> int:
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    return workers or os.cpu_count() or 1


def run_synth(args: argparse.Namespace) -> int:
    from aidetect.data.synth import synth

    counts = synth(
        args.out,
        n=args.n,
        seed=args.seed,
        defects=args.defects,
        workers=check_workers(args.workers),
        min_side=args.min_side,
        max_side=args.max_side,
        sources=args.sources,
        shortcuts=args.shortcuts,
        fragile=args.fragile,
    )
    print(f"wrote {', '.join(f'{v} {k}' for k, v in counts.items())} under {args.out}")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from aidetect.data.pack import pack

    manifest = pack(args.src, args.out, pack_settings(args), workers=check_workers(args.workers))
    run = manifest.get("run")
    speed = f" in {run['seconds']:.1f} s ({run['processed'] / max(run['seconds'], 1e-9):.0f} img/s)" if run else ""
    print(
        f"packed {manifest['samples']} of {manifest['files']} files into {len(manifest['shards'])} shards{speed}; "
        f"repaired {len(manifest['repaired'])}, skipped {len(manifest['skipped'])} "
        f"(reasons in {args.out}/manifest.json)"
    )
    if run and run.get("restored"):
        print(f"  restored {len(run['restored'])} damaged shard(s): {', '.join(run['restored'])}")
    for split, counts in manifest["splits"].items():
        print(f"  {split:<6} {counts['total']:>7}  (real {counts['real']}, fake {counts['fake']})")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from aidetect.audit import format_report, write_audit

    report, path = write_audit(args.shards, args.out)
    print(format_report(report))
    print(f"details in {path} and {path.with_suffix('.png')}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from aidetect.config import config_from_args
    from aidetect.hardware import set_cuda_environment
    from aidetect.train import train

    config = config_from_args(args)
    set_cuda_environment(config.train.deterministic)  # before any CUDA work: read once, at cuBLAS's start
    train(config)
    return 0


def run_features(args: argparse.Namespace) -> int:
    from aidetect.config import config_from_args
    from aidetect.features import extract_features
    from aidetect.hardware import set_cuda_environment

    if args.out is None:
        raise UserError("features: --out FOLDER is required, the folder of the feature cache")
    layers = parse_layers(args.layers)
    config = config_from_args(args)
    set_cuda_environment(config.train.deterministic)
    done = extract_features(config, config.train.out, layers)
    rate = done["samples"] / max(done["seconds"], 1e-9)
    print(
        f"[aidetect] features: {done['shards']} shard(s), {done['samples']} images in {done['seconds']:.1f} s "
        f"({rate:.1f} img/s) -> {config.train.out}; shards still missing: {done['missing']}"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from aidetect.data.degrade import parse_perturbations
    from aidetect.inference import evaluate
    from aidetect.robustness import format_robustness

    perturbations = parse_perturbations(args.perturb or [])  # a bad value fails before any checkpoint is read
    metrics, report = evaluate(
        args.checkpoint,
        args.data,
        args.split,
        args.out,
        batch_size=args.batch_size,
        perturbations=perturbations,
        scores_format=args.scores_format,
        crops=args.crops,
        combine=args.combine,
    )
    print(json.dumps(metrics, indent=1))
    if report:
        print(format_robustness(report))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from aidetect.calibration import parse_band
    from aidetect.data.degrade import parse_perturbations
    from aidetect.inference import predict

    perturbations = parse_perturbations([args.perturb]) if args.perturb else [None]
    if len(perturbations) != 1:
        raise UserError(f"--perturb {args.perturb}: predict takes one perturbation, e.g. jpeg:50")
    unsure = parse_band(args.unsure) if args.unsure else None
    counts = predict(
        args.checkpoint,
        args.paths,
        args.csv,
        perturb=perturbations[0],
        unsure=unsure,
        crops=args.crops,
        combine=args.combine,
    )
    print(f"wrote {counts['files']} rows to {args.csv} ({counts['errors']} unreadable, see its error column)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from aidetect.export import export, sidecar_path

    path = export(args.checkpoint, args.format, args.out)
    difference = json.loads(sidecar_path(path).read_text())["check_max_abs_diff"]
    print(f"wrote {path} and {sidecar_path(path)} (largest logit difference from PyTorch: {difference:.2g})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from aidetect.demo import demo

    demo(args.out, n=args.n, workers=check_workers(args.workers), sources=args.sources)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from aidetect.cluster.profiles import load_profile
    from aidetect.cluster.submit import submit_chrono, submit_cv, submit_features, submit_holdout, submit_train, wait
    from aidetect.config import config_from_args
    from aidetect.data.pack import PackSettings

    profile = load_profile(
        args.profile,
        executor=args.executor,
        account=args.account,
        partition=args.partition,
        gpus_per_node=args.gpus_per_node,
        time_limit_min=args.time,
    )
    tasks = args.tasks_per_node or max(profile.gpus_per_node, 1)
    config = config_from_args(args)
    if args.job == "train":
        jobs = submit_train(config, profile, args.nodes, tasks)
    elif args.job == "features":
        jobs = submit_features(config, profile, args.nodes, tasks, parse_layers(args.layers))
    elif args.window is not None and args.by != "time":
        raise UserError("--window applies to --by time")
    elif args.by == "source":
        if args.folds is not None:
            raise UserError("--folds applies to --by fold; --by source runs one job per fake source of the pack")
        jobs = submit_holdout(config, profile, args.nodes, tasks)
    elif args.by == "time":
        if args.folds is not None:
            raise UserError("--folds applies to --by fold; --by time runs one job per window of generators")
        window = {} if args.window is None else {"window": args.window}
        jobs = submit_chrono(config, profile, args.nodes, tasks, **window)
    else:
        jobs = submit_cv(config, profile, PackSettings.folds if args.folds is None else args.folds, args.nodes, tasks)
    if not args.wait:
        return 0
    ok = wait(jobs)
    if args.job == "cv" and ok:
        from aidetect.cluster.report import cv_report, headline

        print(f"[aidetect] cv: {headline(cv_report(Path(config.train.out)))}")
    return 0 if ok else 1


def run_cv_report(args: argparse.Namespace) -> int:
    from aidetect.cluster.report import cv_report

    summary = cv_report(Path(args.run))
    keys = ("n_folds", "n_sources", "n_tasks", "missing", "holdout", "time", "mean", "std")
    shown = [k for k in keys if k in summary]
    print(json.dumps({k: summary[k] for k in shown}, indent=1))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from aidetect.cluster.report import status

    print(status(Path(args.run)))
    return 0


def run_wandb_sync(args: argparse.Namespace) -> int:
    from aidetect.cluster.report import wandb_sync

    return wandb_sync(Path(args.run), list_only=args.list)


def run_weights_fetch(args: argparse.Namespace) -> int:
    from aidetect.weights import HUB, fetch, hub_repo

    for name in args.names:
        path = fetch(name)
        print(f"{name}: {path} (set model.pretrained: {HUB}{hub_repo(name)})")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from aidetect.cluster.profiles import load_profile
    from aidetect.doctor import doctor

    lines, passed = doctor(load_profile(args.profile) if args.profile else None, args.data, args.out)
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


def run_bench_train(args: argparse.Namespace) -> int:
    from aidetect.bench.train import bench_train, format_table
    from aidetect.hardware import PRECISIONS

    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise UserError(f"--precisions: unknown {', '.join(unknown)}; use {', '.join(PRECISIONS)}")
    results = bench_train(
        args.json,
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        precisions=precisions,
        compile_=args.compile,
        data=args.data,
        workers=check_workers(args.workers),
    )
    print(format_table(results))
    return 0


def run_bench_cv(args: argparse.Namespace) -> int:
    from aidetect.bench.cv import bench_cv
    from aidetect.cluster.profiles import load_profile
    from aidetect.config import config_from_args

    config = config_from_args(args)
    results = bench_cv(config, load_profile(args.profile), args.folds, Path(config.train.out), args.json)
    print(
        f"{args.folds} folds in parallel: {results['all_folds_s']:.1f} s; "
        f"one fold alone: {results['one_fold_s']:.1f} s; "
        f"cv_time_ratio {results['cv_time_ratio']:.2f} (sequential would be {args.folds})"
    )
    return 0


def run_bench_data(args: argparse.Namespace) -> int:
    from aidetect.bench.data import bench_data, format_table

    results = bench_data(
        args.src,
        args.shards,
        args.json,
        workers=check_workers(args.workers),
        batch_size=args.batch_size,
        naive_limit=args.naive_limit,
        min_images=args.min_images,
        settings=pack_settings(args),
    )
    print(format_table(results))
    if args.json:
        print(f"figures written to {args.json}")
    else:
        print(json.dumps(results, indent=1))
    return 0


def run_holdout_task(args: argparse.Namespace) -> int:
    from aidetect.cluster.submit import holdout_task
    from aidetect.config import config_from_args

    print("\t".join(holdout_task(args.index, config_from_args(args))))
    return 0


def run_time_task(args: argparse.Namespace) -> int:
    from aidetect.cluster.submit import time_task
    from aidetect.config import config_from_args

    folder, data = time_task(args.index, config_from_args(args), args.window)
    chosen = {key: getattr(data, key) for key in ("train_sources", "test_sources")}
    print("\t".join([folder, *(f"data.{key}={json.dumps(names)}" for key, names in chosen.items())]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
