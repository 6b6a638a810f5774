"""The main job as one Prefect flow: toy world -> image and video data -> every training stage ->
watermarked videos for a few prompts -> the evaluation and the link reading.

Re-running reuses what is done: the world is regenerated only when its config changed, the data
flows resume from their job folders, finished training stages are skipped, and the videos and the
evaluation are kept while the weights and settings that made them are the same (`reuse_step`).
"""
from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from prefect import flow

from pipelines.config import PipelineConfig, dump_config
from pipelines.evaluation.aggregate import summary_metrics
from pipelines.evaluation.links import evaluate_links, first_lost
from pipelines.evaluation.promotion import record_evidence
from pipelines.evaluation.prompts import evaluation_prompts
from pipelines.evaluation.run import evaluate
from pipelines.evaluation.scorer import read_back
from pipelines.flows.images import build_image_dataset
from pipelines.flows.train import train_cascade
from pipelines.flows.videos import build_video_dataset
from pipelines.generate import generate
from pipelines.manifest import format_counts
from pipelines.watermark import WatermarkConfig
from pipelines.world import WorldConfig, generate_world, serve_world
from training.lineage import describe, video_lineage
from training.registry import PromotionPolicy, stage_versions
from training.storage import hash_settings
from training.tracking import default_tracking_uri

# 16 prompts x 2 samples = 32 videos: which prompts are drawn moves the figures as much as a setting does,
# so more prompts (more triples) rather than more samples of a few.
EVAL_PROMPTS = 16
EVAL_SAMPLES = 2
# A seen combination and a held-out one (no captioned image shows a yellow square on black). No motion is
# named: without text-video pairs no stage can learn a caption's motion words.
DEMO_PROMPTS = ("a large red circle on a blue background",
                "a large yellow square on a black background")
# Scored on the video the demo delivers: SR_l, text-conditioned, redraws shapes that read as blobs at 32 px.
EVAL_STAGE = "sr_high"
DEMO_PROMOTION = "toy"  # when a retrained stage's weights replace the current ones (PromotionPolicy.parse)
LINK_DRAWS = 8  # prior and D draws per prompt for the link reading


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - started


def ensure_world(root: Path, cfg: WorldConfig) -> tuple[bool, str]:
    """Generate the world unless `root` already holds this exact config; returns (generated, summary)."""
    meta = root / "world.json"
    if meta.is_file() and json.loads(meta.read_text()).get("config") == cfg.model_dump(mode="json"):
        return False, f"toy world reused from {root}"
    return True, str(generate_world(root, cfg, overwrite=True))


def reuse_step(folder: Path, inputs: dict, run: Callable[[], Any]) -> tuple[Any, bool]:
    """(result, reused). `run()` (a JSON-ready result) runs unless `folder/step.json` records the same
    `inputs`; then its result is returned without running. The record is written only after `run()`
    returned, so a step killed half-way runs again; changed inputs (new weights, another config) too."""
    key = hash_settings(inputs)
    record = folder / "step.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("key") == key:
            return done["result"], True
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "inputs": inputs, "result": result}, indent=2, default=str))
    return result, False


def build_datasets(cfg: PipelineConfig, root: Path, timings: dict[str, float]) -> dict:
    """The image and video datasets, downloaded from the toy world served on 127.0.0.1."""
    world, data = root / "world", root / "data"
    results = {}
    with serve_world(world) as server:
        print(f"toy world served at {server.url}")
        with _timed(timings, "images"):
            images = build_image_dataset([str(world / "laion.parquet")], str(data / "images"), cfg.data.images,
                                         cfg.data.network)
        print(f"image dataset: {data / 'images'}\n" + format_counts(images["counts"], images["rows"]))
        with _timed(timings, "videos"):
            videos = build_video_dataset([("webvid", str(world / "webvid.csv")),
                                          ("hdvila", str(world / "hdvila.jsonl"))],
                                         str(data / "videos"), cfg.data.videos, cfg.data.network)
        print(f"video dataset: {data / 'videos'}\n" + format_counts(videos["counts"], videos["rows"]))
    for kind, built in (("images", images), ("videos", videos)):
        results[kind] = {"path": str(data / kind), "rows": built["rows"], "counts": built["counts"]}
    return results


def make_videos(cfg: PipelineConfig, root: Path, inputs: dict, tracking_uri: str) -> list[dict]:
    """The demo prompts' videos (reused while weights and config are the same), each read back by the
    evaluator as a viewer gets the mp4, less the watermark's label (its sidecar says which mark it carries)."""
    folder = root / "videos"
    # The record names the files inside the run folder, so a rerun of a moved or copied run finds them.
    names, reused = reuse_step(folder, {**inputs, "prompts": DEMO_PROMPTS, "seed": 0},
                               lambda: [{kind: Path(path).name for kind, path in r["files"].items()}
                                        for r in generate(cfg, list(DEMO_PROMPTS), folder,
                                                          tracking_uri=tracking_uri, seed=0)])
    print(f"videos {'reused from' if reused else 'written to'} {folder}")
    videos = [{kind: str(folder / name) for kind, name in files.items()} for files in names]
    for files, prompt in zip(videos, DEMO_PROMPTS):
        mark = json.loads(Path(files["json"]).read_text()).get("watermark", {})
        files["read_back"] = read_back(files["mp4"], prompt, watermark=WatermarkConfig(**mark) if mark else None)
    return videos


def read_links(cfg: PipelineConfig, root: Path, tracking_uri: str) -> dict:
    """The evaluation's prompts read link by link (`pipelines.evaluation.links`): the means and, per link,
    how many prompts whose key frame is wrong were lost there."""
    world, prompts = evaluation_prompts(cfg, str(root / "world"), EVAL_PROMPTS, 0)
    read = evaluate_links(cfg, world=world, prompts=prompts, out_dir=root / "links", tracking_uri=tracking_uri,
                          draws=LINK_DRAWS)
    lost = Counter(first_lost(r) for r in read["rows"])
    lost.pop(None, None)
    return {"summary": read["summary"], "lost": dict(lost)}


def evaluate_demo(cfg: PipelineConfig, root: Path, inputs: dict, tracking_uri: str, lineage: dict,
                  timings: dict[str, float]) -> dict:
    """The evaluation at `EVAL_STAGE` and the link reading, each reused while weights and settings hold."""
    settings = {"prompts": EVAL_PROMPTS, "samples": EVAL_SAMPLES, "stop_at": EVAL_STAGE}
    with _timed(timings, "evaluate"):
        summary, reused = reuse_step(root / "eval", {**inputs, **settings}, lambda: evaluate(
            str(root / "eval"), config=inputs["config"], tracking_uri=tracking_uri, world=str(root / "world"),
            n_prompts=EVAL_PROMPTS, samples_per_prompt=EVAL_SAMPLES, stop_at=EVAL_STAGE, lineage=lineage)["summary"])
    if reused:
        print(f"evaluation reused from {root / 'eval'} (same weights and settings)")
    with _timed(timings, "links"):
        links, reused = reuse_step(root / "links", {**inputs, "prompts": EVAL_PROMPTS, "draws": LINK_DRAWS},
                                   lambda: read_links(cfg, root, tracking_uri))
    if reused:
        print(f"link reading reused from {root / 'links'} (same weights and settings)")
    return {"evaluation": {"out": str(root / "eval"), "stage": EVAL_STAGE, "metrics": summary},
            "links": {"out": str(root / "links"), **links}}


@flow(name="make-a-video-demo", log_prints=True)
def demo_flow(cfg_yaml: str, out: str) -> dict:
    """Everything the pipeline can do, on embedded defaults, with a summary at the end."""
    cfg = PipelineConfig.model_validate(yaml.safe_load(cfg_yaml))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    timings: dict[str, float] = {}
    with _timed(timings, "world"):
        generated, world_summary = ensure_world(root / "world", cfg.world)
    print(world_summary)
    results: dict = {"out": str(root), "world": str(root / "world"), "world_generated": generated,
                     **build_datasets(cfg, root, timings)}
    data = root / "data"
    with _timed(timings, "train"):
        # Retrained stages are challengers judged by the toy bar on the evaluation's own prompts.
        trained = train_cascade(["all"], cfg, str(data / "images"), str(data / "videos"), str(root / "train"),
                                promotion=DEMO_PROMOTION, evaluation={
                                    "world": str(root / "world"), "n_prompts": EVAL_PROMPTS,
                                    "samples_per_prompt": EVAL_SAMPLES, "stop_at": EVAL_STAGE})
    tracking_uri = default_tracking_uri(str((root / "train").resolve()))
    results["train"] = {"run_root": str(root / "train"), "tracking_uri": tracking_uri,
                        "stages": {s: {"version": r.version, "steps": r.steps} for s, r in trained.items()}}
    # No text-video pairs: the video stages' runs name the shards they trained on, read again here.
    results["lineage"] = video_lineage(tracking_uri)
    print(f"lineage: {describe(results['lineage'])}")
    # What the videos and the evaluation depend on: the config and the exact weights (registry versions).
    inputs = {"config": cfg.model_dump(mode="json"), "weights": stage_versions(tracking_uri)}
    with _timed(timings, "generate"):
        results["videos_out"] = make_videos(cfg, root, inputs, tracking_uri)
    results.update(evaluate_demo(cfg, root, inputs, tracking_uri, results["lineage"], timings))
    # The evaluated (current) versions keep the score: what a later challenger of each stage has to beat.
    record_evidence(tracking_uri, {s: v["version"] for s, v in inputs["weights"].items()},
                    summary_metrics(results["evaluation"]["metrics"]), PromotionPolicy.parse(DEMO_PROMOTION))
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (root / "summary.json").write_text(json.dumps(results, indent=2))
    return results
