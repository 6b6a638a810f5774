"""`mav train STAGE|all`: each stage a Ray Train job tracked in MLflow, with the pipeline's CLIP embedding
step after the clip stage (`pipelines.flows.train.train_cascade`)."""
from __future__ import annotations

import argparse
from typing import Any

from pipelines.cli.options import add_config_args, config_from_args
from training.config import STAGES as TRAINED_STAGES


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.flows.train import train_cascade

    results = train_cascade([args.stage], config_from_args(args), images=args.images, videos=args.videos,
                            run_root=args.out, force=args.force, in_process=args.in_process,
                            promotion=args.promotion)
    for result in results.values():
        print(f"{result.stage}: {result.weights_path} (mav-{result.stage} version {result.version}, "
              f"{result.steps} steps)")
    return 0


def add_train_commands(subparsers: Any) -> None:
    """Register `mav train STAGE|all [--preset] [--images DIR] [--videos DIR] [--out RUN_ROOT] [--force]
    [--in-process]`."""
    p = subparsers.add_parser("train", help="train a stage of the cascade, or all in order (Ray Train + MLflow)",
                              description="Each stage is a Ray Train job; weights are registered in MLflow "
                                          "as mav-<stage>@current. Re-running resumes or skips finished stages.")
    p.add_argument("stage", choices=[*TRAINED_STAGES, "all"])
    add_config_args(p)
    p.add_argument("--images", help="image dataset folder (manifest.json, shards/, embeddings/)")
    p.add_argument("--videos", help="video dataset folder (manifest.json, shards/); a video stage reads the clips of "
                   "its train.<stage>.video_datasets (webvid, hdvila), or all of them")
    p.add_argument("--out", default="runs", help="run folder: a local path or an fsspec URL every node reaches "
                   "(s3://...: then also --set train.tracking_uri=URL or MLFLOW_TRACKING_URI) (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain stages that already finished")
    p.add_argument("--promotion", default="none", metavar="POLICY",
                   help="when a new version becomes @current: none (at once), toy (the toy world's quality bar), "
                        "METRIC>=BAR / METRIC<=BAR, or METRIC (beat the current); otherwise it stays @challenger "
                        "(`mav promote` moves it by hand) (default: %(default)s)")
    p.add_argument("--in-process", action="store_true",
                   help="train in this process with the same loop, without Ray: one process whatever "
                        "num_workers says (same global batch), checkpoints in RUN_ROOT/local/ (debugging a stage)")
    p.set_defaults(func=cmd_train)
