"""`mav data images` and `mav data videos`: the data flows (Prefect; heavy work on Ray or the tools' own
workers)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.cli.options import add_config_args
from pipelines.config import ConfigError


def cmd_data_images(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.flows.images import image_data
    from pipelines.images.plan import MetadataError, check_metadata

    overrides = list(args.overrides)
    for flag, field in (("url_col", "url_col"), ("caption_col", "caption_col")):
        if getattr(args, flag):
            overrides.append(f"data.images.{field}={json.dumps(getattr(args, flag))}")
    metadata, config = [str(p) for p in args.metadata], str(args.config) if args.config else None
    try:  # unreadable files and unmapped columns: one line before the flow starts
        check_metadata(metadata, load_config(args.preset, config, overrides).data.images)
        image_data(metadata=metadata, out=str(args.out), preset=args.preset, config=config, overrides=overrides,
                   overwrite=args.overwrite, retry_failed=args.retry_failed)
    except MetadataError as err:
        raise ConfigError(str(err)) from None
    return 0


def cmd_data_videos(args: argparse.Namespace) -> int:
    sources = [("webvid", str(p)) for p in args.webvid] + [("hdvila", str(p)) for p in args.hdvila]
    if not sources:
        raise ConfigError("mav data videos: give at least one --webvid CSV or --hdvila JSONL")
    from pipelines.flows.videos import check_metadata, video_data

    check_metadata(sources)  # an unreadable file: one line before any flow starts
    video_data(sources=sources, out=str(args.out), preset=args.preset,
               config=str(args.config) if args.config else None, overrides=args.overrides,
               overwrite=args.overwrite, rewrite_base=args.rewrite_base, retry_failed=args.retry_failed)
    return 0


def _add_images(data_sub: Any) -> None:
    d = data_sub.add_parser("images", help="filter LAION-style metadata and download it into webdataset shards",
                            description="Filter LAION-style parquet metadata (NSFW, watermark, toxic words, size, "
                                        "similarity), download the kept rows with img2dataset through the egress "
                                        "policy, and write shards, outcomes.parquet and manifest.json into --out. "
                                        "Re-running resumes.")
    add_config_args(d)
    d.add_argument("metadata", nargs="+", help="parquet file(s) with URL, TEXT, ... columns")
    d.add_argument("--url-col", metavar="NAME", help="the URL column (default: data.images.url_col, URL)")
    d.add_argument("--caption-col", metavar="NAME", help="the caption column (default: data.images.caption_col, TEXT)")
    add_dataset_args(d)
    d.set_defaults(func=cmd_data_images)


def add_dataset_args(d: argparse.ArgumentParser) -> None:
    """The options every data flow takes: where the dataset goes and what a rerun does."""
    d.add_argument("--out", required=True, help="dataset folder (local path or fsspec URL)")
    d.add_argument("--overwrite", action="store_true", help="replace a dataset built from other inputs/settings")
    d.add_argument("--retry-failed", action="store_true",
                   help="fetch the rows whose download failed once more (into new shards); refusals are kept")


def _add_videos(data_sub: Any) -> None:
    d = data_sub.add_parser("videos", help="download WebVid / HD-VILA videos and clips into webdataset shards",
                            description="Read WebVid-10M CSV and HD-VILA-100M JSONL metadata, download through the "
                                        "egress policy, cut HD-VILA spans into clips, scale to the configured size, "
                                        "and write text-free shards, outcomes.parquet and manifest.json into --out. "
                                        "Captions are dropped: the video side never carries text. Re-running resumes.")
    add_config_args(d)
    d.add_argument("--webvid", nargs="+", default=[], metavar="FILE",
                   help="WebVid metadata, CSV or parquet (videoid and contentUrl required)")
    d.add_argument("--hdvila", nargs="+", default=[], metavar="JSONL",
                   help="HD-VILA-100M metadata, JSON lines as released")
    d.add_argument("--rewrite-base", metavar="URL",
                   help="point every URL at this loopback mirror first (tests, demos: never the real hosts)")
    add_dataset_args(d)
    d.set_defaults(func=cmd_data_videos)


def add_data_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("data", help="build datasets: `mav data images` (LAION-style) or `mav data videos`",
                              description="Data flows (Prefect; heavy work on Ray or the tools' own workers).")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="images|videos")
    _add_images(data_sub)
    _add_videos(data_sub)
