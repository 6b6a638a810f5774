"""Options that several `mav` commands share, declared once: the config (--preset/--config/--set), the
weights (--weights, --tracking-uri) and sampling (--stop-at, --seed, --fps). Defaults come from the
library (`pipelines.defaults`), not from literals here."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipelines.config import PipelineConfig, load_config
from pipelines.defaults import DEFAULT_FPS

PRESETS = ("tiny", "toy", "paper", "paper-cpu")


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "toy") -> None:
    p.add_argument("--preset", choices=PRESETS, default=default_preset, help="named sizes (default: %(default)s)")
    p.add_argument("--config", type=Path, help="a YAML config file (e.g. one dumped by `mav config`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set world.seed=3 --set train.decoder.lr=2e-4")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config tree of `add_config_args`' options: the preset, then the YAML file, then each --set."""
    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def add_weights_args(p: argparse.ArgumentParser, checkpoints: bool = False) -> None:
    """--weights and --tracking-uri; with `checkpoints`, --checkpoints DIR as the alternative to --weights."""
    source = p.add_mutually_exclusive_group() if checkpoints else p
    source.add_argument("--weights", default="mlflow", metavar="SOURCE",
                        help="'mlflow' (models:/mav-<stage>@current in the tracking store) or a folder of "
                             "<stage>.safetensors files")
    if checkpoints:
        source.add_argument("--checkpoints", type=Path, metavar="DIR", help="a folder of <stage>.safetensors files")
    p.add_argument("--tracking-uri", help="MLflow store (default: train.tracking_uri, $MLFLOW_TRACKING_URI, "
                                          "sqlite runs/mlflow.db)")


def add_sampling_args(p: argparse.ArgumentParser, stages: Sequence[str]) -> None:
    """--stop-at (one of `stages`), --seed and --fps."""
    p.add_argument("--stop-at", choices=stages, help=f"last stage to run (default: {stages[-1]})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frame rate of the base clip (default: %(default)s)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
