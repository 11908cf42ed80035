"""The ``aidetect`` command line: parses arguments and calls library functions, nothing more.

Errors the user can fix (``UserError``, bad arguments) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aidetect.allocator import keep_freed_memory
from aidetect.errors import USER_ERROR_EXIT_CODE, UserError
from aidetect.preemption import Outcome


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of the usage block plus the error."""

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
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    synth = commands.add_parser("synth", help="write a synthetic real/fake ImageFolder for demos and tests")
    synth.add_argument("out", help="output folder (new or empty)")
    synth.add_argument("--n", type=int, default=1000, help="number of images, half per class (default 1000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--defects", action="store_true", help="add the broken files scraped datasets hold")
    synth.add_argument("--min-side", type=int, default=320, help="shortest image side in px (default 320)")
    synth.add_argument("--max-side", type=int, default=2048, help="longest image side in px (default 2048)")
    synth.add_argument(
        "--sources",
        type=int,
        default=1,
        help="fake sources fake/gen1..genN, each its own upsampler; N >= 2 also splits reals into "
        "real/photo and real/art (default 1: files straight in real/ and fake/)",
    )
    synth.add_argument(
        "--shortcuts",
        action="store_true",
        help="classes differ in file metadata as in some Kaggle sets: fakes PNG at 3 square sizes, "
        "reals JPEG of varied sizes, some with EXIF (default: both classes alike)",
    )
    synth.add_argument(
        "--fragile",
        action="store_true",
        help="a trace JPEG q50 all but destroys: strong fine grain on reals, a faint upsampler trace on fakes",
    )
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.set_defaults(handler=run_synth)

    pack = commands.add_parser("pack", help="pack an ImageFolder into WebDataset shards with fixed splits")
    pack.add_argument("src", help="ImageFolder (SRC/real, SRC/fake) or Kaggle layout (SRC/{train,test}/...)")
    pack.add_argument("out", help="output folder for shards and manifest.json")
    add_pack_options(pack)
    pack.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pack.set_defaults(handler=run_pack)

    audit = commands.add_parser("audit", help="can file metadata alone tell fake from real? (shortcut check)")
    audit.add_argument("shards", help="pack folder")
    audit.add_argument("--out", default=None, help="folder for audit.json and audit.png (default: the pack folder)")
    audit.set_defaults(handler=run_audit)

    train = commands.add_parser("train", help="train a detector (1 process, torchrun or srun)")
    add_config_options(train)
    train.add_argument("--resume", default=None, help="'auto' (last.pt in the run folder) or a checkpoint path")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("evaluate", help="metrics and plots of a checkpoint on a split of a pack")
    evaluate.add_argument("checkpoint", help="e.g. runs/NAME/best.pt")
    evaluate.add_argument("--data", required=True, help="pack folder")
    evaluate.add_argument("--split", default="test", help="test (default), fold0, ...")
    evaluate.add_argument(
        "--out", default=None, help="folder for eval_SPLIT.json, robustness.json and plots (default: the checkpoint's)"
    )
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument(
        "--perturb",
        nargs="+",
        metavar="KIND[:S,..]",
        help="robustness sweep of both classes on the stored images: none, jpeg:Q,.. (quality), blur:SIGMA,.. "
        "(px), downscale:F,.. (factor < 1), e.g. jpeg:95,75,50,30 blur:1,2,3 downscale:0.5,0.25; after the "
        "clean evaluation, one per strength -> robustness.json, robustness.png",
    )
    evaluate.set_defaults(handler=run_evaluate)

    predict = commands.add_parser("predict", help="probability that raw images are AI-generated, as CSV")
    predict.add_argument("checkpoint", help="e.g. runs/NAME/best.pt")
    predict.add_argument("paths", nargs="+", help="image files or folders")
    predict.add_argument("--csv", default="predictions.csv", help="output CSV (default predictions.csv)")
    predict.add_argument(
        "--perturb",
        metavar="KIND:S",
        help="degrade each file before preprocessing: one of jpeg:Q, blur:SIGMA, downscale:F (e.g. jpeg:50)",
    )
    predict.set_defaults(handler=run_predict)

    demo = commands.add_parser("demo", help="synthetic data -> pack -> train -> test metrics, minutes on a CPU")
    demo.add_argument("--out", default="demo", help="folder for data, shards and the run (default demo)")
    demo.add_argument("--n", type=int, default=2000, help="synthetic images (default 2000)")
    demo.add_argument("--sources", type=int, default=1, help="fake sources, as for synth (default 1)")
    demo.add_argument("--workers", type=int, default=None)
    demo.set_defaults(handler=run_demo)

    submit = commands.add_parser("submit", help="submit training or cross-validation jobs with submitit")
    jobs = submit.add_subparsers(dest="job", required=True, parser_class=OneLineErrorParser)
    for kind, text in (("train", "one training run"), ("cv", "K folds as one parallel job array")):
        job = jobs.add_parser(kind, help=text)
        job.add_argument("--profile", required=True, help="cluster profile: hpc/NAME.yaml name or a YAML path")
        job.add_argument("--executor", choices=("slurm", "local"), help="override the profile's (local: no SLURM)")
        job.add_argument("--account", help="SLURM account (overrides the profile's)")
        job.add_argument("--partition", help="SLURM partition (overrides the profile's)")
        job.add_argument("--nodes", type=int, default=1)
        job.add_argument("--gpus-per-node", type=int, help="overrides the profile's; one task per GPU")
        job.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, else 1)")
        job.add_argument("--time", type=int, help="time limit in minutes (jobs requeue themselves before it)")
        job.add_argument("--wait", action="store_true", help="block until the jobs end; non-zero exit if any failed")
        if kind == "cv":
            job.add_argument(
                "--by",
                choices=("fold", "source"),
                default="fold",
                help="fold: one job per fold (default); source: leave-one-source-out, one job per fake source "
                "of the pack, trained without it and tested on it (RUN/holdout-SOURCE)",
            )
            job.add_argument("--folds", type=int, help="folds to run, --by fold only (default 5; the pack's at most)")
        add_config_options(job)
        job.set_defaults(handler=run_submit)

    report = commands.add_parser(
        "cv-report", help="cv_summary.json and plots from a cross-validation or leave-one-source-out run"
    )
    report.add_argument("run", help="the cv run folder (holding fold0/, fold1/, ... or holdout-SOURCE/, ...)")
    report.set_defaults(handler=run_cv_report)
    status = commands.add_parser("status", help="state and progress of a submitted run or cross-validation")
    status.add_argument("run", help="run folder")
    status.set_defaults(handler=run_status)
    sync = commands.add_parser("wandb-sync", help="upload every offline wandb run under a run folder")
    sync.add_argument("run", help="run folder")
    sync.add_argument("--list", action="store_true", help="only list the offline runs")
    sync.set_defaults(handler=run_wandb_sync)

    doctor = commands.add_parser(
        "doctor", help="check this node (or every rank of a job) before spending an allocation"
    )
    doctor.add_argument("--profile", help="cluster profile: the GPUs it expects, runs_dir and wandb mode")
    doctor.add_argument("--data", help="pack folder: every shard present with the manifest's size and sha256")
    doctor.add_argument("--out", help="run folder whose file system must have room (default: the profile's runs_dir)")
    doctor.set_defaults(handler=run_doctor)

    bench = commands.add_parser("bench", help="benchmarks that print figures and write JSON")
    benches = bench.add_subparsers(dest="bench", required=True, parser_class=OneLineErrorParser)
    data = benches.add_parser("data", help="pack and loader throughput against decode floors and the naive pipeline")
    data.add_argument("--src", required=True, help="raw ImageFolder")
    data.add_argument("--shards", required=True, help="pack folder (packed from --src first if it holds none)")
    data.add_argument("--json", default=None, help="write the figures to this JSON file")
    data.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--naive-limit", type=int, default=192, help="images timed through the naive pipeline")
    data.add_argument("--min-images", type=int, default=4096, help="images timed through the loader and its floor")
    add_pack_options(data)
    data.set_defaults(handler=run_bench_data)
    loop = benches.add_parser("train", help="training-loop throughput vs a bare PyTorch loop, per precision")
    loop.add_argument("--json", default=None, help="write the figures to this JSON file")
    loop.add_argument("--model", default="seed_cnn2")
    loop.add_argument("--image-size", type=int, default=128)
    loop.add_argument("--batch-size", type=int, default=32)
    loop.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    loop.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16, auto (train.precision auto's)"
    )
    loop.add_argument("--compile", action="store_true", help="also time torch.compile")
    loop.add_argument(
        "--data", default=None, help="pack folder: also time the loop fed by the training loader from it (loader_fed)"
    )
    loop.add_argument("--workers", type=int, default=None, help="loader processes for --data (default: all cores)")
    loop.set_defaults(handler=run_bench_train)
    cv = benches.add_parser("cv", help="K folds as a parallel job array vs one fold alone, on a cluster profile")
    cv.add_argument("--profile", default="local", help="cluster profile (default: the local test cluster)")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--json", default=None, help="write the figures to this JSON file")
    add_config_options(cv)
    cv.set_defaults(handler=run_bench_cv)
    return parser


def add_pack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="resize", help="resize (pad to square + resize) or crop (native crop)")
    parser.add_argument("--size", type=int, default=256, help="output side in px (default 256)")
    parser.add_argument("--codec", default="jpeg", help="jpeg or png (lossless)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share held out as test (default 0.1)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the rest (default 5)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-pixels", type=int, default=250_000_000, help="pixel budget of one decoded image")
    parser.add_argument("--min-side", type=int, default=32, help="skip images with a shorter side")
    parser.add_argument("--on-truncated", default="repair", help="repair (inpaint the missing part) or skip")
    parser.add_argument(
        "--parity",
        default="none",
        help="jpeg:Q re-encodes every image of both classes as JPEG at quality Q before preprocessing, so codec "
        "and quality cannot carry the label (default none)",
    )


CONFIG_FLAGS = {
    "data": "data.shards",
    "model": "model.name",
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "precision": "train.precision",
    "out": "train.out",
    "fold": "data.fold",
    "pretrained": "model.pretrained",
    "holdout_source": "data.holdout_source",
}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file or bundled config name (smoke, seed_model2, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    parser.add_argument("--data", help="pack folder (data.shards)")
    parser.add_argument("--model", help="model.name: seed_cnn1, seed_cnn2, resnet18, resnet50, ...")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--batch-size", type=int, help="data.batch_size, per process")
    parser.add_argument("--lr", type=float, help="optim.lr")
    parser.add_argument("--precision", help="train.precision: auto, fp32, bf16, fp16")
    parser.add_argument("--out", help="train.out: the run folder")
    parser.add_argument("--fold", type=int, help="data.fold: the validation fold")
    parser.add_argument("--pretrained", help="model.pretrained: a local weights file (nothing is downloaded)")
    parser.add_argument(
        "--holdout-source",
        help="data.holdout_source: train and validate without this fake source; test on the real test samples "
        "and all of its samples",
    )


def config_from_args(args: argparse.Namespace):
    from aidetect.config import load_config, parse_override

    overrides = dict(parse_override(text) for text in args.set)
    overrides |= {key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    if getattr(args, "resume", None):
        overrides["train.resume"] = args.resume
    return load_config(args.config, overrides)


def pack_settings(args: argparse.Namespace):
    from aidetect.data.pack import PackSettings

    return PackSettings(
        mode=args.mode,
        size=args.size,
        codec=args.codec,
        quality=args.quality,
        seed=args.seed,
        test_fraction=args.test_fraction,
        folds=args.folds,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
        on_truncated=args.on_truncated,
        parity=args.parity,
    )


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
    from aidetect.train import train

    train(config_from_args(args))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from aidetect.data.degrade import parse_perturbations
    from aidetect.inference import evaluate
    from aidetect.robustness import format_robustness

    perturbations = parse_perturbations(args.perturb or [])  # a bad value fails before any checkpoint is read
    metrics, report = evaluate(
        args.checkpoint, args.data, args.split, args.out, batch_size=args.batch_size, perturbations=perturbations
    )
    print(json.dumps(metrics, indent=1))
    if report:
        print(format_robustness(report))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from aidetect.data.degrade import parse_perturbations
    from aidetect.inference import predict

    perturbations = parse_perturbations([args.perturb]) if args.perturb else [None]
    if len(perturbations) != 1:
        raise UserError(f"--perturb {args.perturb}: predict takes one perturbation, e.g. jpeg:50")
    counts = predict(args.checkpoint, args.paths, args.csv, perturb=perturbations[0])
    print(f"wrote {counts['files']} rows to {args.csv} ({counts['errors']} unreadable, see its error column)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from aidetect.demo import demo

    demo(args.out, n=args.n, workers=check_workers(args.workers), sources=args.sources)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from aidetect.cluster.profiles import load_profile
    from aidetect.cluster.submit import submit_cv, submit_holdout, submit_train, wait

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
    elif args.by == "source":
        if args.folds is not None:
            raise UserError("--folds applies to --by fold; --by source runs one job per fake source of the pack")
        jobs = submit_holdout(config, profile, args.nodes, tasks)
    else:
        jobs = submit_cv(config, profile, 5 if args.folds is None else args.folds, args.nodes, tasks)
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
    shown = ("n_sources", "missing", "holdout") if "holdout" in summary else ("n_folds", "missing", "mean", "std")
    print(json.dumps({k: summary[k] for k in shown}, indent=1))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from aidetect.cluster.report import status

    print(status(Path(args.run)))
    return 0


def run_wandb_sync(args: argparse.Namespace) -> int:
    from aidetect.cluster.report import wandb_sync

    return wandb_sync(Path(args.run), list_only=args.list)


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


if __name__ == "__main__":
    sys.exit(main())
