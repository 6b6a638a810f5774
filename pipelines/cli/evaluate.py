"""`mav evaluate`: score the trained cascade on toy-world prompts against the quality bar, or with --links
read where each prompt is lost before the video stages (`pipelines.evaluation`)."""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any, Callable

from pipelines.cli.options import (add_config_args, add_sampling_args, add_weights_args, config_from_args,
                                   positive_int)
from pipelines.defaults import STAGES


def cmd_links(cfg: Any, args: argparse.Namespace) -> int:
    from pipelines.evaluation.links import evaluate_links
    from pipelines.evaluation.prompts import evaluation_prompts

    world = str(args.world) if args.world else None
    world_cfg, prompts = evaluation_prompts(cfg, world, args.prompts, args.seed)
    evaluate_links(cfg, world=world_cfg, prompts=prompts, out_dir=args.out, weights=args.weights,
                   tracking_uri=args.tracking_uri, draws=args.links, seed=args.seed)
    return 0


def cmd_evaluate(runner: Callable[..., dict] | None, args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # config errors surface here, before Prefect or torch start
    if args.links is not None:
        return cmd_links(cfg, args)
    if runner is None:
        from pipelines.flows.evaluate import evaluate_flow as runner
    runner(out=str(args.out), preset=cfg.preset, weights=args.weights, tracking_uri=args.tracking_uri,
           world=str(args.world) if args.world else None, n_prompts=args.prompts, samples_per_prompt=args.samples,
           seed=args.seed, config=cfg.model_dump(mode="json"), stop_at=args.stop_at, fps=args.fps)
    return 0


def add_evaluate_commands(subparsers: Any, runner: Callable[..., dict] | None = None) -> None:
    """Register `mav evaluate`. `runner` replaces the Prefect flow (same keyword arguments), e.g. its
    plain body `pipelines.evaluation.run.evaluate` in tests."""
    p = subparsers.add_parser("evaluate", help="score the trained cascade on toy-world prompts (quality bar)",
                              description="Generate toy-world prompts (held-out combinations included) with the "
                                          "trained cascade, score every video (prompt faithfulness, temporal "
                                          "consistency, motion, frame quality), compute CLIPSIM and, with "
                                          "--world, a relative FVD; log it all to MLflow and print a table.")
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for evaluation.json, videos.csv and GIFs")
    add_weights_args(p)
    p.add_argument("--world", type=Path, help="a generated toy world: held-out triples and FVD reference videos")
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="prompts (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, metavar="N", help="samples per prompt (default: %(default)s)")
    add_sampling_args(p, STAGES[1:])
    p.add_argument("--links", type=positive_int, metavar="DRAWS",
                   help="instead of videos, read where each prompt is lost before the video stages: CLIP's "
                        "text embedding, DRAWS prior embeddings, D from the true embedding of world renders and "
                        "D from the prior's (the key frame); links.json in --out and an MLflow run "
                        "'evaluate-links' (seconds on a CPU)")
    p.set_defaults(func=partial(cmd_evaluate, runner))
