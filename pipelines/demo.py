"""`mav demo`: run the demo flow and print plainly what it produced and where."""
from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import PipelineConfig, dump_config


def run_demo(cfg: PipelineConfig, out: Path) -> int:
    from pipelines.flows.demo import demo_flow
    from training.lineage import describe

    started = time.perf_counter()
    results = demo_flow(dump_config(cfg), str(out))
    minutes = (time.perf_counter() - started) / 60
    print()
    print(f"Make-A-Video demo ({cfg.preset} preset) finished in {minutes:.1f} min. What it made:")
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
    lineage = results["lineage"]
    print(f"  lineage         {describe(lineage)}")
    ev = results["evaluation"]
    means, bar = ev["metrics"]["all"], ev["metrics"]["quality_bar"]
    passed = bar["passed"] and lineage["text_free"]  # an evaluation of older code has no lineage check of its own
    print(f"  evaluation      {ev['out']}  ({ev['stage']} stage: "
          f"faithfulness {means['prompt_faithfulness']:.2f}, "
          f"consistency {means['temporal_consistency']:.2f}, motion share {means['motion_share']:.2f}; "
          f"quality bar {'PASSED' if passed else 'not reached'})")
    links = results.get("links")
    if links:
        means, lost = links["summary"]["all"], links["lost"]
        print(f"  links           {links['out']}  (before Dt, shares right: text {means['text']:.2f}, prior "
              f"{means['prior']:.2f}, D from the true embedding {means['decoder']:.2f}, key frame "
              f"{means['keyframe']:.2f}; wrong key frames lost at: "
              + (", ".join(f"{k} {v}" for k, v in sorted(lost.items())) or "none") + ")")
    print(f"  timings (s)     {results['timings_s']}")
    return 0
