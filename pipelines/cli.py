"""`mav`: the command line of the Make-A-Video pipeline. Thin: parse, build, run.

Subcommands are added as parts of the pipeline land; each one runs for real.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.env import configure_environment

PRESETS = ("tiny", "toy", "paper")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str = "toy") -> None:
    p.add_argument("--preset", choices=PRESETS, default=default_preset, help="named sizes (default: %(default)s)")
    p.add_argument("--config", type=Path, help="a YAML config file (e.g. one dumped by `mav config`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set world.seed=3 --set train.decoder.lr=2e-4")


def _load(args: argparse.Namespace):
    from pipelines.config import load_config

    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from pipelines.config import dump_config

    text = dump_config(_load(args), args.out)
    if args.out is None:
        print(text, end="")
    else:
        print(f"wrote {args.out}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from pipelines.world import generate_world

    cfg = _load(args).world
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    t0 = time.perf_counter()
    summary = generate_world(args.out, cfg)
    print(summary)
    print(f"generated in {time.perf_counter() - t0:.1f}s; serve it with: mav world serve {args.out}")
    return 0


def cmd_world_serve(args: argparse.Namespace) -> int:
    from pipelines.world import serve_world

    with serve_world(args.dir, port=args.port) as server:
        print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopped; {len(server.request_log)} requests served")
    return 0


def cmd_data_images(args: argparse.Namespace) -> int:
    from pipelines.flows.images import image_data

    image_data(metadata=[str(p) for p in args.metadata], out=str(args.out), preset=args.preset,
               config=str(args.config) if args.config else None, overrides=args.overrides, overwrite=args.overwrite,
               retry_failed=args.retry_failed)
    return 0


def cmd_data_videos(args: argparse.Namespace) -> int:
    from pipelines.flows.videos import video_data

    sources = [("webvid", str(p)) for p in args.webvid] + [("hdvila", str(p)) for p in args.hdvila]
    if not sources:
        raise ConfigError("mav data videos: give at least one --webvid CSV or --hdvila JSONL")
    video_data(sources=sources, out=str(args.out), preset=args.preset,
               config=str(args.config) if args.config else None, overrides=args.overrides,
               overwrite=args.overwrite, rewrite_base=args.rewrite_base, retry_failed=args.retry_failed)
    return 0


def _train_runner(*args, **kwargs):
    from pipelines.flows.train import train_cascade

    return train_cascade(*args, **kwargs)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(_load(args), Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mav",
        description="Make-A-Video as a pipeline: toy world, data flows, staged training, generation.",
        epilog="Every command keeps its state under $MAV_STATE_DIR (default ./.state).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print or write the resolved config tree (YAML)",
                       description="Resolve a preset, a YAML file and --set overrides into one config tree.")
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="write the YAML here instead of printing it")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("world", help="generate the toy world, or serve it (`mav world serve DIR`)",
                       description="Generate the built-in toy world: captioned shape images (LAION parquet), "
                                   "unlabeled shape videos (WebVid CSV, HD-VILA JSONL), deliberately bad rows "
                                   "and a ground-truth file. `mav world serve DIR` serves it on 127.0.0.1.")
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="folder to write the world into")
    p.add_argument("--seed", type=int, help="override world.seed")
    p.set_defaults(func=cmd_world)
    world_sub = p.add_subparsers(dest="world_command", metavar="serve")
    s = world_sub.add_parser("serve", help="serve a generated world over HTTP on 127.0.0.1")
    s.add_argument("dir", type=Path)
    s.add_argument("--port", type=int, help="default: the port in the world's base_url; 0 picks a free one")
    s.set_defaults(func=cmd_world_serve)

    p = sub.add_parser("data", help="build datasets: `mav data images` (LAION-style) or `mav data videos`",
                       description="Data flows (Prefect; heavy work on Ray or the tools' own workers).")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="images|videos")
    d = data_sub.add_parser("images", help="filter LAION-style metadata and download it into webdataset shards",
                            description="Filter LAION-style parquet metadata (NSFW, watermark, toxic words, size, "
                                        "similarity), download the kept rows with img2dataset through the egress "
                                        "policy, and write shards, outcomes.parquet and manifest.json into --out. "
                                        "Re-running resumes.")
    _add_config_args(d)
    d.add_argument("metadata", nargs="+", help="parquet file(s) with URL, TEXT, ... columns")
    d.add_argument("--out", required=True, help="dataset folder (local path or fsspec URL)")
    d.add_argument("--overwrite", action="store_true", help="replace a dataset built from other inputs/settings")
    d.add_argument("--retry-failed", action="store_true",
                   help="fetch the rows whose download failed once more (into new shards); refusals are kept")
    d.set_defaults(func=cmd_data_images)
    d = data_sub.add_parser("videos", help="download WebVid / HD-VILA videos and clips into webdataset shards",
                            description="Read WebVid-10M CSV and HD-VILA-100M JSONL metadata, download through the "
                                        "egress policy, cut HD-VILA spans into clips, scale to the configured size, "
                                        "and write text-free shards, outcomes.parquet and manifest.json into --out. "
                                        "Captions are dropped: the video side never carries text. Re-running resumes.")
    _add_config_args(d)
    d.add_argument("--webvid", nargs="+", default=[], metavar="CSV", help="WebVid-style CSV file(s)")
    d.add_argument("--hdvila", nargs="+", default=[], metavar="JSONL", help="HD-VILA-style JSONL file(s)")
    d.add_argument("--out", required=True, help="dataset folder (local path or fsspec URL)")
    d.add_argument("--rewrite-base", metavar="URL",
                   help="point every URL at this loopback mirror first (tests, demos: never the real hosts)")
    d.add_argument("--overwrite", action="store_true", help="replace a dataset built from other inputs/settings")
    d.add_argument("--retry-failed", action="store_true",
                   help="fetch the failed downloads once more (into new shards); refusals are kept")
    d.set_defaults(func=cmd_data_videos)

    from pipelines.flows.evaluate import add_evaluate_commands
    from pipelines.generate import add_generate_commands
    from training.cli import add_train_commands

    add_train_commands(sub, _load, _add_config_args, runner=_train_runner)
    add_generate_commands(sub, _add_config_args, _load)
    add_evaluate_commands(sub, _add_config_args, _load)

    p = sub.add_parser("demo", help="the main job end to end on the toy preset",
                       description="Run the whole chain as far as it exists, reusing what is already done.")
    _add_config_args(p)
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
