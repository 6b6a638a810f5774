"""`mav generate | animate | interpolate | vary`: the paper's four uses of the trained cascade, each output
written as mp4, GIF, frame grid and JSON sidecar, watermarked (`pipelines.generate`)."""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from pipelines.cli.options import add_config_args, add_sampling_args, add_weights_args, config_from_args
from pipelines.config import ConfigError
from pipelines.defaults import STAGES
from pipelines.watermark import WatermarkConfig

# (command, use, help, positional arguments) of the four uses.
USES = [("generate", "text", "text to video with the trained cascade",
         [("prompts", {"nargs": "+", "metavar": "PROMPT"})]),
        ("animate", "animate", "animate an image (it becomes frame 0)", [("image", {"type": Path})]),
        ("interpolate", "interpolate", "generate the frames between two images",
         [("image_a", {"type": Path}), ("image_b", {"type": Path})]),
        ("vary", "vary", "variations of a video (its frames' mean CLIP embedding)", [("video", {"type": Path})])]


def _stage_overrides(args: argparse.Namespace) -> list[str]:
    """--steps/--sampler/--guidance "VALUE" (every stage) or "STAGE=VALUE" -> config --set overrides."""
    out = []
    for flag, field in (("steps", "steps"), ("sampler", "name"), ("guidance", "guidance_scale")):
        for item in getattr(args, flag) or []:
            stage, _, value = item.rpartition("=")
            if stage and stage not in STAGES:
                raise ConfigError(f"--{flag} {item}: unknown stage {stage!r}; choose one of {list(STAGES)}")
            out += [f"cascade.{s}.sampler.{field}={value}" for s in ([stage] if stage else STAGES)]
    return out


def _watermark(args: argparse.Namespace) -> WatermarkConfig:
    if args.no_watermark:
        return WatermarkConfig(enabled=False)
    return WatermarkConfig(text=args.watermark_text, logo_path=args.watermark_logo)


def print_summary(records: Sequence[dict], seconds: float) -> None:
    print(f"\n{len(records)} output(s) in {seconds:.1f} s:")
    for r in records:
        size = f"{r['frames']} frames {r['size'][1]}x{r['size'][0]}" if "frames" in r else "embedding only"
        print(f"  {r['name']:<40} {r['stage']:<13} {size:<24} {r['files'][next(iter(r['files']))]}")


def cmd_generate(use: str, args: argparse.Namespace) -> int:
    args.overrides = list(getattr(args, "overrides", []) or []) + _stage_overrides(args)
    cfg = config_from_args(args)  # config errors surface here, before torch loads
    from pipelines.generate import animate, generate, interpolate, vary

    common = {"out_dir": args.out, "seed": args.seed, "fps": args.fps, "stop_at": args.stop_at,
              "target_frames": args.target_frames, "watermark": _watermark(args), "device": args.device,
              "weights": str(args.checkpoints) if args.checkpoints else args.weights,
              "tracking_uri": args.tracking_uri}
    started = time.perf_counter()
    if use == "text":
        records = generate(cfg, args.prompts, batch_size=args.batch_size, **common)
    elif use == "animate":
        records = animate(cfg, args.image, **common)
    elif use == "interpolate":
        records = interpolate(cfg, args.image_a, args.image_b, **common)
    else:
        records = vary(cfg, args.video, count=args.count, **common)
    print_summary(records, time.perf_counter() - started)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_weights_args(p, checkpoints=True)
    add_sampling_args(p, STAGES)
    for flag, what in (("steps", "sampler steps"), ("sampler", "sampler (ddpm|ddim|dpmpp_2m)"),
                       ("guidance", "guidance scale")):
        p.add_argument(f"--{flag}", action="append", metavar="[STAGE=]VALUE",
                       help=f"{what} for every stage, or STAGE=VALUE for one; repeatable")
    p.add_argument("--frames", "--target-frames", dest="target_frames", type=int,
                   help="length after interpolation (default: (frames-1)*frame_skip+1)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-watermark", action="store_true", help="leave the frames unmarked")
    p.add_argument("--watermark-text", default=WatermarkConfig().text)
    p.add_argument("--watermark-logo", help="an image drawn as the watermark instead of the text")


def add_generate_commands(subparsers: Any) -> None:
    """Register `mav generate | animate | interpolate | vary`."""
    for command, use, help_text, positionals in USES:
        p = subparsers.add_parser(command, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}; "
                                  "writes mp4, GIF, a frame grid and a JSON sidecar per output, watermarked.")
        add_config_args(p)
        for name, kwargs in positionals:
            p.add_argument(name, **kwargs)
        _add_common(p)
        if use == "text":
            p.add_argument("--batch-size", type=int, default=1, help="prompts per cascade call")
        if use == "vary":
            p.add_argument("--count", type=int, default=1, help="variations to make")
        p.set_defaults(func=partial(cmd_generate, use))
