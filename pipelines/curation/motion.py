"""Motion: how fast the picture moves, as the mean optical-flow magnitude (OpenCV's Farneback) between
frame pairs spread over the clip, in fractions of the frame side per second (independent of the
resolution and frame rate the clip was stored at). A clip below `CurationConfig.motion_floor` is still."""
from __future__ import annotations

import cv2
import numpy as np

from pipelines.curation.config import CurationConfig
from pipelines.curation.frames import downscale, grey, spread


def motion_score(frames: np.ndarray, fps: float, config: CurationConfig = CurationConfig()) -> float:
    """Mean flow magnitude (side / s) of the clip's (F, H, W, 3) RGB frames; 0.0 for a single frame."""
    gap = max(1, round(config.motion_gap_s * fps))
    if len(frames) <= gap:
        gap = len(frames) - 1
    if gap < 1:
        return 0.0
    firsts = spread(len(frames) - gap, config.motion_pairs)
    picked = grey(downscale(frames[np.concatenate([firsts, firsts + gap])], config.work_size))
    side = max(picked.shape[1:])
    speeds = []
    for a, b in zip(picked[:len(firsts)], picked[len(firsts):]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        speeds.append(float(np.hypot(flow[..., 0], flow[..., 1]).mean()) / side / (gap / fps))
    return float(np.mean(speeds))


def is_still(score: float, config: CurationConfig = CurationConfig()) -> bool:
    return score < config.motion_floor
