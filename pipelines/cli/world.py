"""`mav config` (the resolved config tree) and `mav world` (generate or serve the toy world)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipelines.cli.options import add_config_args, config_from_args
from pipelines.config import dump_config
from pipelines.world import generate_world, serve_world


def cmd_config(args: argparse.Namespace) -> int:
    text = dump_config(config_from_args(args), args.out)
    if args.out is None:
        print(text, end="")
    else:
        print(f"wrote {args.out}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    cfg = config_from_args(args).world
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    t0 = time.perf_counter()
    summary = generate_world(args.out, cfg)
    print(summary)
    print(f"generated in {time.perf_counter() - t0:.1f}s; serve it with: mav world serve {args.out}")
    return 0


def cmd_world_serve(args: argparse.Namespace) -> int:
    with serve_world(args.dir, port=args.port) as server:
        print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopped; {len(server.request_log)} requests served")
    return 0


def add_config_command(subparsers: Any) -> None:
    p = subparsers.add_parser("config", help="print or write the resolved config tree (YAML)",
                              description="Resolve a preset, a YAML file and --set overrides into one config tree.")
    add_config_args(p)
    p.add_argument("--out", type=Path, help="write the YAML here instead of printing it")
    p.set_defaults(func=cmd_config)


def add_world_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("world", help="generate the toy world, or serve it (`mav world serve DIR`)",
                              description="Generate the built-in toy world: captioned shape images (LAION parquet), "
                                          "unlabeled shape videos (WebVid CSV, HD-VILA JSONL), deliberately bad "
                                          "rows and a ground-truth file. `mav world serve DIR` serves it on "
                                          "127.0.0.1.")
    add_config_args(p)
    p.add_argument("--out", type=Path, help="folder to write the world into")
    p.add_argument("--seed", type=int, help="override world.seed")
    p.set_defaults(func=cmd_world)
    world_sub = p.add_subparsers(dest="world_command", metavar="serve")
    s = world_sub.add_parser("serve", help="serve a generated world over HTTP on 127.0.0.1")
    s.add_argument("dir", type=Path)
    s.add_argument("--port", type=int, help="default: the port in the world's base_url; 0 picks a free one")
    s.set_defaults(func=cmd_world_serve)
