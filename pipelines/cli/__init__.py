"""`mav`: the command line of the Make-A-Video pipeline. Thin: parse, build, run.

One module per command group; options several commands share are declared once in `options`. A command
imports the work it runs (torch, Prefect, Ray, MLflow) inside its handler: `mav --help` stays fast, and
`configure_environment` has set those tools' state folders before any of them is imported.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.cli.data import add_data_commands
from pipelines.cli.demo import add_demo_command
from pipelines.cli.evaluate import add_evaluate_commands
from pipelines.cli.generate import add_generate_commands
from pipelines.cli.plan import add_plan_command
from pipelines.cli.promote import add_promote_command
from pipelines.cli.train import add_train_commands
from pipelines.cli.world import add_config_command, add_world_commands, cmd_world
from pipelines.config import ConfigError
from pipelines.env import configure_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mav",
        description="Make-A-Video as a pipeline: toy world, data flows, staged training, generation.",
        epilog="Every command keeps its state under $MAV_STATE_DIR (default ./.state).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (add_config_command, add_world_commands, add_data_commands, add_train_commands,
                         add_plan_command, add_generate_commands, add_evaluate_commands, add_promote_command,
                         add_demo_command):
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_world and args.out is None:
        parser.error("mav world: --out DIR is required (or use `mav world serve DIR`)")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:  # config and input errors: one clear line, no traceback
        print(f"mav {args.command}: error: {err}", file=sys.stderr)
        return 2
