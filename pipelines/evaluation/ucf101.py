"""UCF-101 zero-shot, as Make-A-Video's Table 2 reports it (FVD 367.23, IS 33.00; later systems ~240-330
FVD and up to ~48 IS): a prompt per class (its name as text in configurable templates), `samples` videos
in all spread evenly over the 101 classes (10K by default, as the paper), FVD on the Kinetics-400 I3D
(224 px, [-1, 1]) against real UCF-101 clips read from the dataset's folders, and IS with the UCF-101 C3D.

Sample i is class i mod C with template (i div C) mod T; the real side is `real_clips` clips (default: as
many as the samples, capped by the dataset) spread evenly over the classes. The per-class table gives each
class's sample count and, when the C3D's classes are the dataset's (101 in folder-name order), how often
C3D recognises the prompted class and its mean probability.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.c3d import C3DClassifier
from model.feature_extractors import I3DExtractor
from model.metrics import fid_of_stats, inception_score
from pipelines.defaults import DEFAULT_FPS, STAGES
from pipelines.evaluation.datasets import (DEFAULT_TEMPLATES, class_prompts, read_clip, ucf101_classes,
                                           ucf101_reference)
from pipelines.evaluation.generation import generate_all, read_video, video_path
from pipelines.evaluation.protocols import (GRID_VIDEOS, cache_key, cached_features, features_of, index_batches,
                                            log_protocol, require_file, sample_grid, stats_of, write_table)
from pipelines.evaluation.references import output_shape
from pipelines.evaluation.tracking import experiment_of
from pipelines.generate import tracking_uri_of
from training.tracker import DEFAULT_ALIAS

PAPER_SAMPLES = 10_000


def _per_class(classes: Sequence[str], present: Sequence[int], logits: np.ndarray) -> list[dict]:
    """One row per class: samples made, and C3D's top-1 share and mean probability of the prompted class
    when its classes are the dataset's."""
    c = len(classes)
    rows = [{"class": name, "samples": 0} for name in classes]
    known = logits.shape[1] == c
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy() if known else None
    for row_index, i in enumerate(present):
        row = rows[i % c]
        row["samples"] += 1
        if known:
            row["c3d_top1"] = row.get("c3d_top1", 0.0) + float(probs[row_index].argmax() == i % c)
            row["c3d_prob"] = row.get("c3d_prob", 0.0) + float(probs[row_index, i % c])
    for row in rows:
        for key in ("c3d_top1", "c3d_prob"):
            if key in row:
                row[key] = round(row[key] / max(row["samples"], 1), 4)
    return rows


def _features(out: Path, present: list[int], reference: list, frames: int, side: int, stride: int,
              i3d_path: Path, c3d_path: Path, batch: int, device: str) -> tuple[float, np.ndarray]:
    """(FVD, C3D logits of the samples): each feature set cached per batch under out/features."""
    i3d, c3d = I3DExtractor(i3d_path, device), C3DClassifier(c3d_path, device)
    fake = lambda net: lambda part: features_of(net, np.stack([read_video(out, i) for i in part]))  # noqa: E731
    real = lambda part: features_of(i3d, np.stack([read_clip(reference[i][1], frames, side, stride)  # noqa: E731
                                                   for i in part]))
    fake_files = cached_features(out / "features" / f"i3d-fake-{cache_key(i3d_path, present, batch)}",
                                 index_batches(present, batch, fake(i3d)))
    real_key = cache_key(i3d_path, [str(p) for _, p in reference], frames, side, stride, batch)
    real_files = cached_features(out / "features" / f"i3d-real-{real_key}",
                                 index_batches(range(len(reference)), batch, real))
    fvd = fid_of_stats(stats_of(real_files), stats_of(fake_files))
    logit_files = cached_features(out / "features" / f"c3d-fake-{cache_key(c3d_path, present, batch)}",
                                  index_batches(present, batch, fake(c3d)))
    return fvd, np.concatenate([np.load(f) for f in logit_files])


def evaluate_ucf101(cfg: Any, *, dataset_root: str | Path, out: str | Path, i3d: str | Path | None,
                    c3d: str | Path | None, weights: str = "mlflow", tracking_uri: str | None = None,
                    alias: str = DEFAULT_ALIAS, samples: int = PAPER_SAMPLES,
                    templates: Sequence[str] = DEFAULT_TEMPLATES, real_clips: int | None = None,
                    real_stride: int = 1, seed: int = 0, stop_at: str | None = None, fps: float = DEFAULT_FPS,
                    actors: int | None = None, batch_size: int = 4, feature_batch: int = 8,
                    device: str | None = None, parent_run_id: str | None = None) -> dict:
    """Run the protocol (see the module doc) into `out` and log it to MLflow; resumable (videos and
    features already in `out` are kept). Returns run_id, metrics, counts (made/skipped/failed), out."""
    i3d_path, c3d_path = require_file(i3d, "I3D weights", "--i3d"), require_file(c3d, "C3D weights", "--c3d")
    classes = ucf101_classes(dataset_root)
    if samples < 2:
        raise ValueError(f"FVD needs at least 2 samples, got {samples}")
    prompts = class_prompts(classes, templates)
    frames, side = output_shape(cfg, stop_at)
    out, uri = Path(out), tracking_uri_of(cfg, tracking_uri)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    made = generate_all(cfg.model_dump(mode="json"), out, lambda i: prompts[classes[i % len(classes)]][
        (i // len(classes)) % len(templates)], samples, weights=weights, tracking_uri=uri, alias=alias,
        stop_at=stop_at, fps=fps, seed=seed, batch_size=batch_size, actors=actors, device=device)
    present = [i for i in range(samples) if video_path(out, i).is_file()]
    reference = ucf101_reference(dataset_root, classes, real_clips or samples)
    fvd, logits = _features(out, present, reference, frames, side, real_stride, i3d_path, c3d_path,
                            feature_batch, device)
    is_mean, is_std = inception_score(logits, splits=min(10, len(present)), are_probs=False)
    metrics = {"fvd": fvd, "is": is_mean, "is_std": is_std, "samples": len(present), "real_clips": len(reference)}
    write_table(_per_class(classes, present, logits), out / "table.csv")
    sample_grid([read_video(out, i) for i in present[:GRID_VIDEOS]], out / "grid.png")
    settings = {"dataset_root": str(dataset_root), "classes": len(classes), "samples": samples,
                "templates": list(templates), "real_clips": len(reference), "real_stride": real_stride,
                "frames": frames, "side": side, "seed": seed, "stop_at": stop_at or STAGES[-1], "fps": fps,
                "weights": weights, "alias": alias, "i3d": str(i3d_path), "c3d": str(c3d_path), **made["counts"]}
    run_id = log_protocol(uri, experiment_of(cfg), "ucf101", settings=settings, sources=made["sources"],
                          metrics=metrics, out=out, parent_run_id=parent_run_id)
    print(f"ucf101: {len(present)} samples over {len(classes)} classes, FVD {fvd:.2f}, IS {is_mean:.2f} "
          f"+- {is_std:.2f} (paper: FVD 367.23, IS 33.00); {made['counts']}")
    return {"run_id": run_id, "metrics": metrics, "counts": made["counts"], "out": str(out)}
