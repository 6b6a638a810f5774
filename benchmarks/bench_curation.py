"""Precision, recall and throughput of the video curation scorers (pipelines/curation/) on the toy world.

A `defects` world (pipelines/world/defects.py: static logos, still videos, hard cuts, near-duplicate
videos and images, each with its ground truth) is generated at a seed; every valid WebVid video is
decoded whole and scored by each scorer, and each scorer's decision is compared with the truth:

    cuts        positive: the video has a cut; a detection counts as right only within `CUT_TOLERANCE_S`
                of the true time (a detected cut elsewhere is a false positive)
    motion      positive: the video is still (its motion score is below the floor)
    overlay     positive: the video carries the logo
    duplicates  positive: a video or image flagged as a duplicate; right when it and the row it names
                are of one true group (an original and its duplicates); videos among videos, images
                among images

clips/s is per scorer, decoding excluded (one core, frames already in memory); `decode_clips_per_s`
says what decoding the whole clip costs, `embed_clips_per_s` what decoding and the thumbnail embedding
cost a duplicate stage (clips/s there is the comparison alone). Duplicates are scored on the weight-free
thumbnail embedding (`pipelines.curation.duplicates`); `from_scratch_clip` repeats the comparison on the
toy cascade's CLIP without weights, the model the flows use when none are given. Thresholds are
CurationConfig's defaults, tuned on seed 1; the reported run is seed 0.

    PYTHONPATH=. python benchmarks/bench_curation.py [--seed 0] [--world DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from model.config import cascade_preset
from pipelines.curation import (CurationConfig, cut_times, decode_span, find_duplicates, has_overlay, is_still,
                                motion_score, overlay_score, thumbnail_embedding)
from pipelines.embed_videos import VideoShardEmbedder
from pipelines.world import generate_world, world_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "curation.json"
CUT_TOLERANCE_S = 0.1


def _file(world: Path, row: dict) -> Path:
    """The served file of a ground-truth row (a redirect row's URL path names it after `to=`)."""
    return world / row["url_path"].split("to=")[-1].lstrip("/")


def _pr(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn}


def score_videos(world: Path, rows: list[dict], config: CurationConfig) -> tuple[dict, dict]:
    """Per scorer: its decisions per key, and the seconds spent in it (decoding apart)."""
    seconds = dict.fromkeys(("decode", "cuts", "motion", "overlay"), 0.0)
    out: dict[str, dict] = {"cuts": {}, "motion": {}, "overlay": {}}
    for row in rows:
        started = time.perf_counter()
        frames, fps, _ = decode_span(_file(world, row))
        seconds["decode"] += time.perf_counter() - started
        for name, fn in (("cuts", lambda: cut_times(frames, fps, config)),
                         ("motion", lambda: motion_score(frames, fps, config)),
                         ("overlay", lambda: overlay_score(frames, config))):
            started = time.perf_counter()
            out[name][row["key"]] = fn()
            seconds[name] += time.perf_counter() - started
    return out, seconds


def judge_videos(rows: list[dict], scores: dict, config: CurationConfig) -> dict[str, dict]:
    counts = {name: [0, 0, 0] for name in ("cuts", "motion", "overlay")}  # tp, fp, fn
    ious = []
    for row in rows:
        key = row["key"]
        cuts = scores["cuts"][key]
        true_cut = row["cut_at"] if row["cut_at"] == row["cut_at"] else None  # NaN: no cut
        hit = true_cut is not None and any(abs(c - true_cut) <= CUT_TOLERANCE_S for c in cuts)
        counts["cuts"][0] += hit
        counts["cuts"][1] += len(cuts) - hit
        counts["cuts"][2] += true_cut is not None and not hit
        verdicts = {"motion": (is_still(scores["motion"][key], config), row["still"]),
                    "overlay": (has_overlay(scores["overlay"][key], config), row["overlay"])}
        for name, (said, true) in verdicts.items():
            counts[name][0] += said and true
            counts[name][1] += said and not true
            counts[name][2] += true and not said
        box = scores["overlay"][key].box
        if row["overlay"] and box is not None:
            ious.append(_iou(box, list(row["overlay_box"])))
    result = {name: _pr(*c) for name, c in counts.items()}
    result["overlay"]["mean_box_iou"] = round(float(np.mean(ious)), 3) if ious else None
    return result


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def embeddings(world: Path, rows: list[dict], embed) -> list[tuple[str, np.ndarray]]:
    """(key, embed(frames)) of each row: the image, or every frame of the video."""
    out = []
    for row in rows:
        path = _file(world, row)
        if row["source"] == "laion":
            frames = np.asarray(Image.open(path).convert("RGB"))[None]
        else:
            frames = decode_span(path)[0]
        out.append((row["key"], embed(frames)))
    return out


def clip_embed(embedder: VideoShardEmbedder):
    """The mean CLIP image embedding of frames resized to CLIP's input side."""
    size = embedder.clip.image_size

    def embed(frames: np.ndarray) -> np.ndarray:
        small = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames[::12]])
        return embedder.embed(small).mean(0)
    return embed


def judge_duplicates(rows: list[dict], verdicts: list) -> dict:
    parent = {r["key"]: r["duplicate_of"] or r["key"] for r in rows}
    original = {}  # key -> its group's original
    for key in parent:
        root = key
        while parent[root] != root:
            root = parent[root]
        original[key] = root
    tp = fp = 0
    for v in verdicts:
        if v.duplicate_of is not None:
            right = original[v.key] == original[v.duplicate_of]  # same group, whichever was kept
            tp, fp = tp + right, fp + (not right)
    positives = sum(r["duplicate_of"] is not None for r in rows)
    result = _pr(tp, fp, positives - tp)
    nearest = {v.key: v.similarity for v in verdicts}  # to the nearest row before it
    true = [nearest[r["key"]] for r in rows if r["duplicate_of"] is not None]
    others = [nearest[r["key"]] for r in rows if r["duplicate_of"] is None]
    result["similarity_duplicates_min"] = round(min(true), 4) if true else None
    result["similarity_others_max"] = round(max(others), 4) if others else None
    return result


def run(world: Path, config: CurationConfig) -> dict:
    truth = pq.read_table(world / "ground_truth.parquet").to_pylist()
    valid = [r for r in truth if r["expected"] == "ok"]
    videos = [r for r in valid if r["source"] == "webvid"]
    scores, seconds = score_videos(world, videos, config)
    stages = judge_videos(videos, scores, config)
    for name in ("cuts", "motion", "overlay"):
        stages[name]["clips_per_s"] = round(len(videos) / seconds[name], 1)
    clip = clip_embed(VideoShardEmbedder(cascade_preset("toy").clip))
    for source in ("webvid", "laion"):  # videos among videos, images among images
        subset = [r for r in valid if r["source"] == source]
        started = time.perf_counter()
        rows = embeddings(world, subset, thumbnail_embedding)
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        verdicts = list(find_duplicates(rows, config))
        spent = time.perf_counter() - started
        stages[f"duplicates_{source}"] = judge_duplicates(subset, verdicts)
        stages[f"duplicates_{source}"]["clips_per_s"] = round(len(rows) / max(spent, 1e-9), 1)
        stages[f"duplicates_{source}"]["embed_clips_per_s"] = round(len(rows) / embed_s, 1)  # decoding included
        clip_verdicts = list(find_duplicates(embeddings(world, subset, clip), config))
        stages[f"duplicates_{source}"]["from_scratch_clip"] = judge_duplicates(subset, clip_verdicts)
    return {"stages": stages, "clips": len(videos), "decode_clips_per_s": round(len(videos) / seconds["decode"], 1)}


NOTES = ("Reproduce: `python benchmarks/run_all.py --only curation` (or `PYTHONPATH=. python "
         "benchmarks/bench_curation.py`; `--seed 1` is the tuning run). The `defects` world preset: a static text "
         "logo on 20% of the valid WebVid-style videos, 12% still, 12% cut to a second scene, 10% of videos and "
         "images near-duplicating an earlier row (pipelines/world/defects.py); every valid video decoded whole and "
         "scored by each scorer of pipelines/curation/ with CurationConfig's defaults, tuned on seed 1 and reported "
         "on seed 0. clips/s: one core, frames already in memory. A cut counts only within 0.1 s of the true one. "
         "Duplicates use a weight-free thumbnail embedding: the toy cascade's CLIP from scratch puts every toy frame "
         "at cosine >= 0.998 (its precision/recall are in the JSON). Image duplicates miss the 0.95 goal: a 2 px "
         "shift of a small triangle and two green shapes at one spot are as close in pixels as true duplicates at "
         "64 px; CLIP weights are the fix.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="world seed (thresholds were tuned on seed 1)")
    parser.add_argument("--world", type=Path, help="generate the world here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_config = world_preset("defects").model_copy(update={"seed": args.seed})
    config = CurationConfig()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or Path(tmp)
        if not (world / "ground_truth.parquet").exists():
            generate_world(world, world_config, overwrite=True)
        result = run(world, config)
    result["settings"] = {"world": "defects", "seed": args.seed, "tuned_on_seed": 1,
                          "world_config": world_config.model_dump(mode="json",
                                                                  include={"n_videos", "n_images", "video_size",
                                                                           "overlay_share", "still_share",
                                                                           "cut_share", "duplicate_share"}),
                          "curation": config.model_dump(mode="json"), "cut_tolerance_s": CUT_TOLERANCE_S,
                          "clip_model": "toy cascade CLIP, from scratch (no weights)", "threads": 1}
    result["device"] = "cpu"
    result["notes"] = NOTES
    result["machine"] = platform.processor() or platform.machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["stages"].items():
        print(f"{name:<18} precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
              f"tp {s['tp']:>3} fp {s['fp']:>3} fn {s['fn']:>3}  clips/s {s.get('clips_per_s', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
