"""MSR-VTT zero-shot, as Make-A-Video's Table 1 reports it (CLIPSIM 0.3049; FID too): one video per
test-split caption from the dataset's own annotation file (all of them by default, `samples` to take the
first N), CLIPSIM (the mean over videos of the mean frame-to-caption cosine, with a local open_clip
ViT-B/32 checkpoint) and frame FID (Inception pool features of every frame, from a local file) against
the frames of the captions' own test videos, read as the generated ones are (same frame count and side).

The table has one row per test video: its captions sampled and their mean CLIPSIM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from model.clip import build_clip
from model.config import ClipConfig
from model.feature_extractors import InceptionExtractor
from model.metrics import clip_similarities, fid_of_stats
from pipelines.defaults import DEFAULT_FPS, STAGES
from pipelines.evaluation.datasets import find_msrvtt_annotations, msrvtt_captions, msrvtt_video, read_clip
from pipelines.evaluation.generation import generate_all, read_video, video_path
from pipelines.evaluation.protocols import (GRID_VIDEOS, cache_key, cached_features, features_of, index_batches,
                                            log_protocol, require_file, sample_grid, stats_of, write_table)
from pipelines.evaluation.references import output_shape
from pipelines.evaluation.tracking import experiment_of
from pipelines.generate import tracking_uri_of
from training.tracker import DEFAULT_ALIAS

CLIPSIM_MODEL = "ViT-B-32"


def scoring_clip(weights: Path, model_name: str = CLIPSIM_MODEL, device: str = "cpu"):
    """(model, tokenizer) of an open_clip architecture with weights from a local file, at the sizes of the
    architecture's own config (224 px and 77 tokens for ViT-B/32)."""
    arch = open_clip.get_model_config(model_name)
    if arch is None:
        raise ValueError(f"unknown CLIP model {model_name!r}; not in open_clip's registry")
    cfg = ClipConfig(model_name=model_name, weights_path=str(weights), embed_dim=arch["embed_dim"],
                     image_size=arch["vision_cfg"]["image_size"],
                     context_length=arch["text_cfg"].get("context_length", 77))
    model, _, tokenizer = build_clip(cfg, device)
    return model, tokenizer


def _frames_of(net: InceptionExtractor, videos: np.ndarray) -> np.ndarray:
    """Inception features of every frame: (B, F, H, W, 3) -> (B, F, 2048)."""
    b, f = videos.shape[:2]
    return features_of(net, videos.reshape(b * f, *videos.shape[2:])).reshape(b, f, -1)


def _scores(out: Path, present: list[int], captions: list, real_ids: list[str], root: Path, frames: int,
            side: int, clip_files: tuple, inception: Path, batch: int, device: str) -> tuple[np.ndarray, float]:
    """(per-sample CLIPSIM, frame FID), each feature set cached per batch under out/features."""
    model, tokenizer = scoring_clip(*clip_files, device=device)
    load = lambda part: np.stack([read_video(out, i) for i in part])  # noqa: E731
    sims = cached_features(
        out / "features" / f"clipsim-{cache_key(clip_files[0], clip_files[1], present, [c for _, c in captions])}",
        index_batches(present, batch, lambda part: clip_similarities(
            model, tokenizer, load(part), [captions[i][1] for i in part]).numpy()))
    net = InceptionExtractor(inception, device)
    fake = cached_features(out / "features" / f"inception-fake-{cache_key(inception, present, batch)}",
                           index_batches(present, batch, lambda part: _frames_of(net, load(part))))
    real = cached_features(out / "features" / f"inception-real-{cache_key(inception, real_ids, frames, side, batch)}",
                           index_batches(real_ids, batch, lambda part: _frames_of(net, np.stack(
                               [read_clip(msrvtt_video(root, v), frames, side) for v in part]))))
    return np.concatenate([np.load(f) for f in sims]), fid_of_stats(stats_of(real), stats_of(fake))


def _per_video(captions: list, present: list[int], sims: np.ndarray) -> list[dict]:
    rows: dict[str, dict] = {}
    for i, sim in zip(present, sims):
        row = rows.setdefault(captions[i][0], {"video_id": captions[i][0], "captions": 0, "clipsim": 0.0})
        row["captions"] += 1
        row["clipsim"] += float(sim)
    return [{**r, "clipsim": round(r["clipsim"] / r["captions"], 5)} for r in rows.values()]


def evaluate_msrvtt(cfg: Any, *, dataset_root: str | Path, out: str | Path, clip: str | Path | None,
                    inception: str | Path | None, clip_model: str = CLIPSIM_MODEL, weights: str = "mlflow",
                    tracking_uri: str | None = None, alias: str = DEFAULT_ALIAS, samples: int | None = None,
                    seed: int = 0, stop_at: str | None = None, fps: float = DEFAULT_FPS, actors: int | None = None,
                    batch_size: int = 4, feature_batch: int = 8, device: str | None = None,
                    parent_run_id: str | None = None) -> dict:
    """Run the protocol (see the module doc) into `out` and log it to MLflow; resumable. Returns run_id,
    metrics, counts (made/skipped/failed), out."""
    clip_path = require_file(clip, f"CLIP {clip_model} weights", "--clip-weights")
    inception_path = require_file(inception, "Inception weights", "--inception")
    root = Path(dataset_root)
    captions = msrvtt_captions(find_msrvtt_annotations(root))[:samples]
    if len(captions) < 2:
        raise ValueError(f"FID needs at least 2 captions, the annotations give {len(captions)}")
    real_ids = list(dict.fromkeys(v for v, _ in captions))
    for video_id in real_ids:  # every real video before any generation: a missing one is one clear line
        msrvtt_video(root, video_id)
    frames, side = output_shape(cfg, stop_at)
    out, uri = Path(out), tracking_uri_of(cfg, tracking_uri)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    made = generate_all(cfg.model_dump(mode="json"), out, lambda i: captions[i][1], len(captions), weights=weights,
                        tracking_uri=uri, alias=alias, stop_at=stop_at, fps=fps, seed=seed, batch_size=batch_size,
                        actors=actors, device=device)
    present = [i for i in range(len(captions)) if video_path(out, i).is_file()]
    sims, frame_fid = _scores(out, present, captions, real_ids, root, frames, side, (clip_path, clip_model),
                              inception_path, feature_batch, device)
    metrics = {"clipsim": float(sims.mean()), "fid": frame_fid, "samples": len(present), "real_videos": len(real_ids)}
    write_table(_per_video(captions, present, sims), out / "table.csv")
    sample_grid([read_video(out, i) for i in present[:GRID_VIDEOS]], out / "grid.png")
    settings = {"dataset_root": str(root), "captions": len(captions), "frames": frames, "side": side, "seed": seed,
                "stop_at": stop_at or STAGES[-1], "fps": fps, "weights": weights, "alias": alias,
                "clip_model": clip_model, "clip": str(clip_path), "inception": str(inception_path), **made["counts"]}
    run_id = log_protocol(uri, experiment_of(cfg), "msrvtt", settings=settings, sources=made["sources"],
                          metrics=metrics, out=out, parent_run_id=parent_run_id)
    print(f"msrvtt: {len(present)} captions, CLIPSIM {metrics['clipsim']:.4f}, frame FID {frame_fid:.2f} "
          f"(paper: CLIPSIM 0.3049); {made['counts']}")
    return {"run_id": run_id, "metrics": metrics, "counts": made["counts"], "out": str(out)}
