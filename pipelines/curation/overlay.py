"""Static overlays (watermarks, logos, burnt-in text) without a trained detector: what stays put while
the picture moves.

Over frames spread across the clip, a pixel holds a persistent edge when its horizontal (or vertical)
Sobel response is strong in nearly all of them (`overlay_persistence`): an edge that moves (the
content) is at any pixel only part of the time; an edge fixed to the frame (the overlay) is there
throughout, whatever passes under it. Near the centre of a zoom or a growing shape edges move slowly,
so it takes nearly all frames, not most, to tell them from an overlay. An overlay has persistent edges
of both orientations; a shape that slides along one of its own straight edges leaves persistent edges of
one orientation only, so the score is the smaller of the two shares of the frame. A clip that does not
move carries no such evidence (everything stays put) and scores 0; the motion stage judges it.
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from pipelines.curation.config import CurationConfig
from pipelines.curation.frames import downscale, grey, spread

MOVING_LEVELS = 24  # a pixel moves when a colour channel spans more than this (x264 noise stays below)
MIN_MOVING_SHARE = 0.005  # ... and a clip moves when this share of its pixels does


class Overlay(NamedTuple):
    """The overlay score of a clip and where the persistent edges are: [x0, y0, x1, y1] as fractions of
    the frame's width and height (None when there are none)."""

    score: float
    box: list[float] | None


def overlay_score(frames: np.ndarray, config: CurationConfig = CurationConfig()) -> Overlay:
    """Score (share of the frame under persistent edges of both orientations) of (F, H, W, 3) RGB frames."""
    colour = downscale(frames[spread(len(frames), config.overlay_frames)], config.work_size)
    # Colour, not luma, tells what moves: a green shape on gray is nearly the gray's luma.
    moving = float(((colour.max(0) - colour.min(0)).max(-1) > MOVING_LEVELS).mean())
    if len(colour) < 3 or moving < MIN_MOVING_SHARE:
        return Overlay(0.0, None)
    stack = grey(colour).astype(np.float32)
    gx = np.stack([np.abs(cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3)) for f in stack])
    gy = np.stack([np.abs(cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)) for f in stack])
    q = 1 - config.overlay_persistence
    px, py = np.quantile(gx, q, axis=0) > config.overlay_edge, np.quantile(gy, q, axis=0) > config.overlay_edge
    score = float(min(px.mean(), py.mean()))
    return Overlay(score, _box(px | py) if score > 0 else None)


def _box(mask: np.ndarray) -> list[float]:
    """Bounding box of the largest cluster of persistent-edge pixels (closed over a few pixels, so the
    letters of one logo join), in fractions of the width and height."""
    h, w = mask.shape
    closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(closed)
    x, y, bw, bh, _ = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))] if n > 1 else (0, 0, w, h, 0)
    return [x / w, y / h, (x + bw) / w, (y + bh) / h]


def has_overlay(result: Overlay, config: CurationConfig = CurationConfig()) -> bool:
    return result.score >= config.overlay_min_score
