"""The reference side of FVD: the toy world's own videos, at the length and size the cascade delivers.

FVD here uses `model.feature_extractors.RandomVideoExtractor`: a relative, in-project figure (smaller is closer to the
world's own videos) that compares runs with each other, never with published I3D FVDs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import decord
import numpy as np
import pyarrow.parquet as pq

from pipelines.defaults import STAGES

FVD_FEATURES = "RandomVideoExtractor(seed=0): relative, in-project; not comparable with I3D FVD"


def output_shape(cascade_cfg: Any, stop_at: str | None) -> tuple[int, int]:
    """(frames, side) of the videos `text_to_video` returns when it stops after `stop_at`."""
    s = getattr(cascade_cfg, "cascade", cascade_cfg).shape
    stage = stop_at or STAGES[-1]
    if stage not in STAGES[1:]:
        raise ValueError(f"stop_at must be one of {list(STAGES[1:])} to give videos, got {stop_at!r}")
    frames = s.frames if stage == "temporal" else s.interpolated_frames
    side = {"temporal": s.base_size, "interpolation": s.base_size, "sr_low": s.sr_low_size}.get(stage, s.sr_high_size)
    return frames, side


def load_reference_videos(world_dir: str | Path, frames: int, side: int, seconds: float,
                          limit: int | None = None) -> list[np.ndarray]:
    """The world's own decodable videos as (frames, side, side, 3) uint8: `frames` frames evenly over
    the first `seconds` (the generated clips' duration), resized to the generated side."""
    root = Path(world_dir)
    table = pq.read_table(root / "ground_truth.parquet", columns=["source", "sample_id", "expected"]).to_pylist()
    ids = sorted({r["sample_id"] for r in table if r["source"] != "laion" and r["expected"] not in ("corrupt", "html")})
    videos = []
    for sample_id in ids[:limit]:
        path = root / "files" / "videos" / f"{sample_id}.mp4"
        if not path.is_file():
            continue  # http_404 rows have no file
        reader = decord.VideoReader(str(path))
        last = min(len(reader) - 1, round(seconds * reader.get_avg_fps()))
        idx = np.linspace(0, last, frames).round().astype(int).tolist()
        video = reader.get_batch(idx).asnumpy()  # (F, H, W, 3)
        videos.append(np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in video]))
    if not videos:
        raise FileNotFoundError(f"no decodable videos in {root / 'files' / 'videos'}")
    return videos
