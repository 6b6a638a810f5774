"""The `mav train` command. pipelines/cli.py registers it (training never imports pipelines); the jobs
themselves load only when the command runs, so `mav --help` stays fast."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from training.config import STAGES


def add_train_commands(subparsers: Any, load_config: Callable[[argparse.Namespace], Any],
                       add_config_args: Callable[[argparse.ArgumentParser], None] | None = None,
                       runner: Callable[..., dict] | None = None) -> None:
    """Register `mav train STAGE|all [--preset] [--images DIR] [--videos DIR] [--out RUN_ROOT] [--force]
    [--in-process]`.
    `load_config(args)` turns the parsed arguments into the config tree (the CLI's own loader);
    `add_config_args(parser)` adds the CLI's shared --preset/--config/--set (else only --preset);
    `runner` replaces `train_all` (same arguments), e.g. to add the pipeline's embedding step."""
    p = subparsers.add_parser("train", help="train a stage of the cascade, or all in order (Ray Train + MLflow)",
                              description="Each stage is a Ray Train job; weights are registered in MLflow "
                                          "as mav-<stage>@current. Re-running resumes or skips finished stages.")
    p.add_argument("stage", choices=[*STAGES, "all"])
    if add_config_args is not None:
        add_config_args(p)
    else:
        p.add_argument("--preset", choices=("tiny", "toy", "paper"), default="toy")
    p.add_argument("--images", help="image dataset folder (manifest.json, shards/, embeddings/)")
    p.add_argument("--videos", help="video dataset folder (manifest.json, shards/)")
    p.add_argument("--out", default="runs", help="run folder: a local path or an fsspec URL every node reaches "
                   "(s3://...: then also --set train.tracking_uri=URL or MLFLOW_TRACKING_URI) (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain stages that already finished")
    p.add_argument("--in-process", action="store_true",
                   help="train in this process with the same loop, without Ray: one process whatever "
                        "num_workers says (same global batch), checkpoints in RUN_ROOT/local/ (debugging a stage)")
    p.set_defaults(func=lambda args: cmd_train(args, load_config, runner))


def cmd_train(args: argparse.Namespace, load_config: Callable[[argparse.Namespace], Any],
              runner: Callable[..., dict] | None = None) -> int:
    if runner is None:
        from training.jobs import train_all as runner
    results = runner([args.stage], load_config(args), images=args.images, videos=args.videos,
                     run_root=args.out, force=args.force, in_process=args.in_process)
    for result in results.values():
        print(f"{result.stage}: {result.weights_path} (mav-{result.stage} version {result.version}, "
              f"{result.steps} steps)")
    return 0
