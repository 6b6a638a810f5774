"""Scene cuts: where a clip jumps to another scene, and the parts a clip splits into at its cuts.

The detector is PySceneDetect's ContentDetector (what video2dataset's cut detection runs): a cut is a
frame whose HSV content differs from the previous one's by more than the threshold.
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
from scenedetect.detectors import ContentDetector

from pipelines.curation.config import CurationConfig
from pipelines.curation.frames import downscale


class Part(NamedTuple):
    """One piece of a clip split at its cuts: its own span, and the span of the clip it came from."""

    index: int
    start: float
    end: float
    source_start: float
    source_end: float


def cut_times(frames: np.ndarray, fps: float, config: CurationConfig = CurationConfig()) -> list[float]:
    """Seconds from the first frame at which the clip cuts to another scene; `frames` is every frame of
    the clip, (F, H, W, 3) RGB uint8."""
    small = downscale(frames, config.work_size)
    detector = ContentDetector(threshold=config.cut_threshold, min_scene_len=max(1, round(config.min_part_s * fps)))
    cuts = []
    for i, frame in enumerate(small):
        cuts += detector.process_frame(i, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return [c / fps for c in cuts if c > 0]


def split_at_cuts(start: float, end: float, cuts: list[float], min_part_s: float = 0.0) -> list[Part]:
    """The parts of the clip `[start, end)` (seconds in its video) between its cuts (seconds from
    `start`); a cut within `min_part_s` of an end or of the previous kept cut is ignored."""
    bounds = [start]
    for t in sorted(start + c for c in cuts):
        if t - bounds[-1] >= min_part_s and end - t >= min_part_s:
            bounds.append(t)
    bounds.append(end)
    return [Part(i, round(a, 6), round(b, 6), start, end) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
