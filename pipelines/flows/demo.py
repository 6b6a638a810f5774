"""The main job as one Prefect flow: toy world -> image and video data -> (training, generation as they land).

Re-running reuses what is done: the world is regenerated only when its config changed, and the data
flows resume from their job folders.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from pipelines.config import PipelineConfig, dump_config
from pipelines.flows.images import build_image_dataset
from pipelines.flows.videos import build_video_dataset
from pipelines.manifest import format_counts
from pipelines.world import WorldConfig, generate_world, serve_world


def ensure_world(root: Path, cfg: WorldConfig) -> tuple[bool, str]:
    """Generate the world unless `root` already holds this exact config; returns (generated, summary)."""
    meta = root / "world.json"
    if meta.is_file() and json.loads(meta.read_text()).get("config") == cfg.model_dump(mode="json"):
        return False, f"toy world reused from {root}"
    return True, str(generate_world(root, cfg, overwrite=True))


@flow(name="make-a-video-demo", log_prints=True)
def demo_flow(cfg_yaml: str, out: str) -> dict:
    """Everything the pipeline can do so far, on embedded defaults, with a summary at the end."""
    import yaml

    cfg = PipelineConfig.model_validate(yaml.safe_load(cfg_yaml))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    generated, world_summary = ensure_world(root / "world", cfg.world)
    print(world_summary)
    timings["world"] = time.perf_counter() - t0
    results: dict = {"out": str(root), "world": str(root / "world"), "world_generated": generated}
    with serve_world(root / "world") as server:
        print(f"toy world served at {server.url}")
        t0 = time.perf_counter()
        images = build_image_dataset([str(root / "world" / "laion.parquet")], str(root / "data" / "images"),
                                     cfg.data.images, cfg.data.network)
        timings["images"] = time.perf_counter() - t0
        results["images"] = {"path": str(root / "data" / "images"), "rows": images["rows"],
                             "counts": images["counts"]}
        print(f"image dataset: {root / 'data' / 'images'}\n" + format_counts(images["counts"], images["rows"]))
        t0 = time.perf_counter()
        world = root / "world"
        videos = build_video_dataset([("webvid", str(world / "webvid.csv")), ("hdvila", str(world / "hdvila.jsonl"))],
                                     str(root / "data" / "videos"), cfg.data.videos, cfg.data.network)
        timings["videos"] = time.perf_counter() - t0
        results["videos"] = {"path": str(root / "data" / "videos"), "rows": videos["rows"],
                             "counts": videos["counts"]}
        print(f"video dataset: {root / 'data' / 'videos'}\n" + format_counts(videos["counts"], videos["rows"]))
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (root / "summary.json").write_text(json.dumps(results, indent=2))
    return results
