"""`mav evaluate`: score the trained cascade on toy-world prompts against the quality bar, with --links
read where each prompt is lost before the video stages, or with --protocol ucf101|msrvtt run the paper's
zero-shot protocols on local model files and a local dataset (`pipelines.evaluation`)."""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any, Callable

from pipelines.cli.options import (add_config_args, add_sampling_args, add_weights_args, config_from_args,
                                   positive_int)
from pipelines.config import ConfigError
from pipelines.defaults import STAGES


def cmd_links(cfg: Any, args: argparse.Namespace) -> int:
    from pipelines.evaluation.links import evaluate_links
    from pipelines.evaluation.prompts import evaluation_prompts

    world = str(args.world) if args.world else None
    world_cfg, prompts = evaluation_prompts(cfg, world, args.prompts, args.seed)
    evaluate_links(cfg, world=world_cfg, prompts=prompts, out_dir=args.out, weights=args.weights,
                   tracking_uri=args.tracking_uri, draws=args.links, seed=args.seed)
    return 0


def cmd_protocol(cfg: Any, args: argparse.Namespace) -> int:
    """ucf101 / msrvtt: missing files and datasets are FileNotFoundError lines (printed by `mav`)."""
    if args.dataset_root is None:
        raise FileNotFoundError(f"--protocol {args.protocol} needs --dataset-root (the dataset's own folder)")
    common = dict(dataset_root=args.dataset_root, out=args.out, weights=args.weights, tracking_uri=args.tracking_uri,
                  alias=args.alias, seed=args.seed, stop_at=args.stop_at, fps=args.fps, actors=args.actors,
                  batch_size=args.batch_size)
    try:
        return run_protocol(cfg, args, common)
    except ValueError as err:  # e.g. a template without {}: one line, as config errors are
        raise ConfigError(str(err)) from None


def run_protocol(cfg: Any, args: argparse.Namespace, common: dict) -> int:
    if args.protocol == "ucf101":
        from pipelines.evaluation.ucf101 import PAPER_SAMPLES, evaluate_ucf101

        evaluate_ucf101(cfg, i3d=args.i3d, c3d=args.c3d, samples=args.total or PAPER_SAMPLES,
                        templates=args.template or ["{}"], real_clips=args.real_clips, **common)
    else:
        from pipelines.evaluation.msrvtt import evaluate_msrvtt

        evaluate_msrvtt(cfg, clip=args.clip_weights, inception=args.inception, clip_model=args.clip_model,
                        samples=args.total, **common)
    return 0


def cmd_evaluate(runner: Callable[..., dict] | None, args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # config errors surface here, before Prefect or torch start
    if args.links is not None:
        return cmd_links(cfg, args)
    if args.protocol != "toy":
        return cmd_protocol(cfg, args)
    if runner is None:
        from pipelines.flows.evaluate import evaluate_flow as runner
    runner(out=str(args.out), preset=cfg.preset, weights=args.weights, tracking_uri=args.tracking_uri,
           world=str(args.world) if args.world else None, n_prompts=args.prompts, samples_per_prompt=args.samples,
           seed=args.seed, config=cfg.model_dump(mode="json"), stop_at=args.stop_at, fps=args.fps)
    return 0


def add_evaluate_commands(subparsers: Any, runner: Callable[..., dict] | None = None) -> None:
    """Register `mav evaluate`. `runner` replaces the Prefect flow (same keyword arguments), e.g. its
    plain body `pipelines.evaluation.run.evaluate` in tests."""
    p = subparsers.add_parser("evaluate", help="score the trained cascade: toy-world quality bar, UCF-101, MSR-VTT",
                              description="Generate toy-world prompts (held-out combinations included) with the "
                                          "trained cascade, score every video (prompt faithfulness, temporal "
                                          "consistency, motion, frame quality), compute CLIPSIM and, with "
                                          "--world, a relative FVD; log it all to MLflow and print a table. "
                                          "--protocol ucf101|msrvtt runs the paper's zero-shot protocols instead.")
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
    add_protocol_args(p)
    p.set_defaults(func=partial(cmd_evaluate, runner))


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """--protocol and what the paper's zero-shot protocols read: local model files and the dataset."""
    g = p.add_argument_group("zero-shot protocols (docs/EVALUATION.md); model files are local, never downloaded")
    g.add_argument("--protocol", choices=("toy", "ucf101", "msrvtt"), default="toy",
                   help="toy: the toy world's quality bar; ucf101: FVD (I3D) and IS (C3D) over class prompts; "
                        "msrvtt: CLIPSIM and frame FID over the test captions (default: %(default)s)")
    g.add_argument("--dataset-root", type=Path,
                   help="UCF-101's class folders, or MSR-VTT's folder (annotations, videos)")
    g.add_argument("--i3d", type=Path, help="Kinetics-400 I3D: TorchScript (i3d_torchscript.pt) or state dict")
    g.add_argument("--c3d", type=Path, help="UCF-101 C3D classifier for IS: state dict or TorchScript")
    g.add_argument("--inception", type=Path, help="Inception-v3 for frame FID: state dict or TorchScript")
    g.add_argument("--clip-weights", type=Path, help="open_clip checkpoint for CLIPSIM (state dict)")
    g.add_argument("--clip-model", default="ViT-B-32", help="its open_clip architecture (default: %(default)s)")
    g.add_argument("--total", type=positive_int, metavar="N",
                   help="samples in all (ucf101: 10000 as the paper; msrvtt: every test caption)")
    g.add_argument("--template", action="append", metavar="TEXT",
                   help="ucf101 prompt template with one {} for the class name; repeat to cycle (default: {})")
    g.add_argument("--real-clips", type=positive_int, metavar="N", help="ucf101 real clips (default: --total)")
    g.add_argument("--actors", type=int, metavar="N", help="CPU Ray actors when no GPU (0: no Ray; default 1); "
                                                            "with GPUs one actor per GPU")
    g.add_argument("--batch-size", type=positive_int, default=4, help="prompts per cascade call (default: %(default)s)")
    g.add_argument("--alias", default="current",
                   help="registry alias read with --weights mlflow, e.g. challenger (default: %(default)s)")
