"""`mav plan`: per stage, the memory and compute of training on a given cluster, traced on the meta
device before a GPU is booked (`training.plan`). Exits 1 when some stage cannot fit."""
from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.cli.options import add_config_args, config_from_args
from training.config import PLANNED_STAGES


def cmd_plan(args: argparse.Namespace) -> int:
    from training.plan import GIB, format_plan, parse_memory, plan_cascade

    cfg = config_from_args(args)
    memory = parse_memory(args.gpu_memory)
    stages = tuple(args.stage or PLANNED_STAGES)
    plans = plan_cascade(cfg.cascade, cfg.train, stages, args.gpus, memory, args.gpu, args.mfu)
    if args.json:
        print(json.dumps({"preset": cfg.preset, "gpus": args.gpus, "gpu_memory_gib": memory / GIB, "gpu": args.gpu,
                          "mfu": args.mfu, "stages": [p.as_dict() for p in plans]}, indent=2))
    else:
        print(format_plan(plans, args.gpus, memory, args.gpu, args.mfu))
    missing = [p.stage for p in plans if not p.fits]
    if missing:
        print(f"mav plan: {', '.join(missing)} cannot fit {args.gpus} x {args.gpu_memory}", flush=True)
    return 1 if missing else 0


def add_plan_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="memory and step time of every stage on a cluster, before booking it",
        description="Traces each stage's network on the meta device (no memory, no GPU): parameters, optimizer and "
                    "EMA state, activation bytes per sample with and without checkpointing, FLOPs per sample; then "
                    "picks sharding (DDP, else FSDP), checkpointing and the micro-batch with gradient accumulation "
                    "that make the stage's global batch fit. Exits 1 if some stage cannot fit.")
    add_config_args(p, default_preset="paper")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the stage trains on (default: %(default)s)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB (default: %(default)s)")
    p.add_argument("--gpu", default="h100", choices=("h100", "h200", "a100"),
                   help="sets the bf16 peak FLOP/s for the step-time estimate (default: %(default)s)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the step time "
                                                          "(default: %(default)s)")
    p.add_argument("--stage", action="append", choices=PLANNED_STAGES, help="plan only this stage (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
