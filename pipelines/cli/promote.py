"""`mav promote`: move a stage's `current` alias to a registered version by hand, with the reason recorded
on the version (`training.registry.promote`); the evidence-based moves happen after training."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.cli.options import add_config_args, config_from_args, positive_int
from training.config import STAGES


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.generate import tracking_uri_of
    from training.registry import promote

    uri = tracking_uri_of(config_from_args(args), args.tracking_uri)
    try:
        done = promote(uri, args.stage, args.version, args.reason)
    except (LookupError, ValueError) as err:  # an unknown version or an empty reason: one line
        print(f"mav promote: error: {err}", file=sys.stderr)
        return 2
    print(f"mav-{done['stage']}@current: version {done['previous']} -> {done['version']} ({done['reason']})")
    return 0


def add_promote_command(subparsers: Any) -> None:
    p = subparsers.add_parser("promote", help="point a stage's @current at a registered version, with a reason",
                              description="Move mav-<STAGE>@current to --version by hand; the reason is kept as "
                                          "the version's tag mav.promotion.reason (decision: manual).")
    p.add_argument("stage", choices=STAGES, metavar="STAGE", help=f"one of {', '.join(STAGES)}")
    p.add_argument("--version", type=positive_int, required=True, help="the registered version to make current")
    p.add_argument("--reason", required=True, help="why, recorded on the version")
    add_config_args(p)
    p.add_argument("--tracking-uri", help="MLflow store (default: train.tracking_uri, $MLFLOW_TRACKING_URI, "
                                          "sqlite runs/mlflow.db)")
    p.set_defaults(func=cmd_promote)
