"""`mav demo`: run the demo flow (`pipelines.flows.demo`) and print plainly what it produced and where."""
from __future__ import annotations

import argparse
import time
from typing import Any

from pipelines.cli.options import add_config_args, config_from_args
from pipelines.config import dump_config


def _print_evaluation(results: dict) -> None:
    ev, links = results["evaluation"], results["links"]
    means, bar = ev["metrics"]["all"], ev["metrics"]["quality_bar"]
    print(f"  evaluation      {ev['out']}  ({ev['stage']} stage: "
          f"faithfulness {means['prompt_faithfulness']:.2f}, "
          f"consistency {means['temporal_consistency']:.2f}, motion share {means['motion_share']:.2f}; "
          f"quality bar {'PASSED' if bar['passed'] else 'not reached'})")
    means, lost = links["summary"]["all"], links["lost"]
    print(f"  links           {links['out']}  (before Dt, shares right: text {means['text']:.2f}, prior "
          f"{means['prior']:.2f}, D from the true embedding {means['decoder']:.2f}, key frame "
          f"{means['keyframe']:.2f}; wrong key frames lost at: "
          + (", ".join(f"{k} {v}" for k, v in sorted(lost.items())) or "none") + ")")


def print_results(results: dict, preset: str, minutes: float) -> None:
    from training.lineage import describe

    print()
    print(f"Make-A-Video demo ({preset} preset) finished in {minutes:.1f} min. What it made:")
    print(f"  run folder      {results['out']}  (config.yaml, summary.json)")
    print(f"  toy world       {results['world']}  ({'generated' if results['world_generated'] else 'reused'})")
    images = results["images"]
    written = images["counts"].get("written", 0)
    print(f"  image shards    {images['path']}  ({written} of {images['rows']} rows written; "
          f"the rest filtered or failed with a recorded reason: outcomes.parquet, manifest.json)")
    videos = results["videos"]
    print(f"  video shards    {videos['path']}  ({videos['counts'].get('written', 0)} of {videos['rows']} "
          f"videos/clips written, no text in any sample)")
    train = results["train"]
    print(f"  training        {train['run_root']}  (stages: "
          + ", ".join(f"{s} v{t['version']}" for s, t in train["stages"].items()) + ")")
    print(f"  MLflow          {train['tracking_uri']}")
    print(f"                  browse: .venv/bin/mlflow ui --backend-store-uri {train['tracking_uri']}")
    for files in results["videos_out"]:
        seen = files["read_back"]
        print(f"  video           {files.get('mp4')}  (+ .gif, .grid.png, .json sidecar; watermarked; the evaluator, "
              f"leaving out the label, reads the prompt's shape and colour in {seen['faithful_frames']} of "
              f"{seen['frames']} frames)")
    print(f"  lineage         {describe(results['lineage'])}")
    _print_evaluation(results)
    print(f"  timings (s)     {results['timings_s']}")


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from pipelines.flows.demo import demo_flow

    started = time.perf_counter()
    results = demo_flow(dump_config(cfg), str(args.out))
    print_results(results, cfg.preset, (time.perf_counter() - started) / 60)
    return 0


def add_demo_command(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="the main job end to end on the toy preset",
                              description="Run the whole chain as far as it exists, reusing what is already done.")
    add_config_args(p)
    p.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
