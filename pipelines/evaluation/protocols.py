"""What the paper's zero-shot protocols (`ucf101`, `msrvtt`) share: checking the local files before any
work, cached per-batch features, the sample grid, and the MLflow run they log to.

Features are cached per batch as `<out>/features/<name>-<key>/<batch>.npy`, `key` a hash of the network
file and the settings that change them, so a rerun reads what it has and computes only the rest; the
driver then streams over the batch files (`RunningStats`), never holding every feature at once.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from model.metrics import RunningStats
from pipelines.outputs import write_grid
from training.storage import sha256_file
from training.tracking import MlflowTracker, tracked_run

GRID_VIDEOS = 16  # rows of the logged sample grid, one video per row


def require_file(path: str | Path | None, what: str, flag: str) -> Path:
    """`path` as a Path, or one FileNotFoundError line naming the file, the option and where it looked."""
    if path is None:
        raise FileNotFoundError(f"{what} not given: pass {flag} (a local file; nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p} (from {flag}; nothing is downloaded)")
    return p


def cache_key(*parts: Any) -> str:
    """12 hex digits naming a feature cache: file paths count by their sha256, other parts as JSON."""
    digest = hashlib.sha256()
    for part in parts:
        text = sha256_file(part) if isinstance(part, Path) else json.dumps(part, sort_keys=True, default=str)
        digest.update(text.encode())
    return digest.hexdigest()[:12]


def cached_features(folder: Path, batches: Iterator[tuple[int, Callable[[], np.ndarray]]]) -> list[Path]:
    """For each (k, compute) of `index_batches`: `folder/<k>.npy` holding compute(), run only when the file
    is missing. Returns the batch files in order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, compute in batches:
        path = folder / f"{k:06d}.npy"
        if not path.is_file():
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.asarray(compute(), dtype=np.float32))
            tmp.replace(path)
        files.append(path)
    return files


def features_of(extractor: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray) -> np.ndarray:
    """extractor(pixels) as float32 numpy; (B, F, H, W, 3) to an image extractor gives (B, F, D)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    return extractor(x).float().cpu().numpy()


def stats_of(files: Sequence[Path]) -> RunningStats:
    """`RunningStats` over feature batch files (each (n, D), or (n, F, D) flattened to rows)."""
    stats = None
    for path in files:
        x = np.load(path)
        x = x.reshape(-1, x.shape[-1])
        stats = stats or RunningStats(x.shape[1])
        stats.update(x)
    if stats is None:
        raise ValueError("no features to compare: no samples were made")
    return stats


def index_batches(indices: Sequence[int], batch_size: int, compute: Callable[[Sequence[int]], np.ndarray]
                  ) -> Iterator[tuple[int, Callable[[], np.ndarray]]]:
    """(k, a thunk computing batch k's features with compute(part)) over `indices` in batches."""
    for k, start in enumerate(range(0, len(indices), batch_size)):
        part = indices[start:start + batch_size]
        yield k, (lambda part=part: compute(part))


def sample_grid(videos: Sequence[np.ndarray], path: Path, max_frames: int = 8) -> Path:
    """One row per video, `max_frames` frames spread over each: a PNG to look at the samples by."""
    rows = []
    for video in videos:
        pick = np.linspace(0, len(video) - 1, min(max_frames, len(video))).round().astype(int)
        rows.append(np.concatenate(list(video[pick]), axis=1))  # (H, frames * W, 3)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return write_grid(np.stack(rows), path, columns=1)


def write_table(rows: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def weights_tags(sources: dict[str, dict]) -> dict[str, str]:
    """mav.weights.<stage>: the registry version a stage was read from, else its file's sha256 prefix."""
    return {f"mav.weights.{stage}": (f"{s['source']}/v{s['version']}" if s.get("version") is not None
                                     else f"sha256:{s.get('sha256', '')[:12]}") for stage, s in sources.items()}


def log_protocol(uri: str, experiment: str, name: str, *, settings: dict, sources: dict, metrics: dict,
                 out: Path, parent_run_id: str | None = None) -> str:
    """An MLflow run "evaluate-<name>": settings and weights as params, the metrics, summary.json, the
    table (table.csv) and the sample grid (grid.png) from `out`. Returns the run id."""
    tags = {"mav.stage": "evaluate", "mav.protocol": name, **weights_tags(sources)}
    with tracked_run(MlflowTracker(uri, experiment), f"evaluate-{name}", parent_run_id=parent_run_id,
                     tags=tags) as tracker:
        tracker.log_params({"protocol": name, "eval": settings, "weights": sources})
        tracker.log_metrics({f"{name}.{k}": float(v) for k, v in metrics.items()}, step=0)
        tracker.log_dict({"protocol": name, "settings": settings, "metrics": metrics, "weights": sources},
                         "evaluation/summary.json")
        for file in ("table.csv", "grid.png", "outcomes.jsonl"):
            if (out / file).is_file():
                tracker.log_artifact(str(out / file), "evaluation")
    return tracker.run_id
