"""Decoding a clip's frames for the curation scorers: every frame of a span, small, grey on demand."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import decord
import numpy as np

# decord 0.6 cannot copy out frames scaled to some narrow widths (training/loaders/clips.py): the
# scorers decode at the native size and downscale with OpenCV.


def decode_span(path_or_bytes: str | Path | bytes, start: float | None = None, end: float | None = None
                ) -> tuple[np.ndarray, float, float]:
    """Every frame of `[start, end)` seconds (the whole video by default): (uint8 (F, H, W, 3), fps, the
    time of the first frame returned). Raises ValueError on a span holding no frame, and decord's
    RuntimeError on bytes it cannot read as a video: a caller records either as the clip's reason."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    reader = decord.VideoReader(source, num_threads=1)
    fps = float(reader.get_avg_fps())
    first = 0 if start is None else max(0, int(np.ceil(start * fps - 1e-6)))
    last = len(reader) if end is None else min(len(reader), int(np.ceil(end * fps - 1e-6)))
    if last <= first:
        raise ValueError(f"the span [{start}, {end}) s holds no frame of a {len(reader) / fps:.2f} s video")
    return reader.get_batch(list(range(first, last))).asnumpy(), fps, first / fps


def downscale(frames: np.ndarray, size: int) -> np.ndarray:
    """Frames with their long side at most `size` (area resampling), dtype kept."""
    h, w = frames.shape[1:3]
    scale = size / max(h, w)
    if scale >= 1:
        return frames
    dims = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, dims, interpolation=cv2.INTER_AREA) for f in frames])


def grey(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) RGB uint8 -> (F, H, W) uint8 luma."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def spread(n: int, k: int) -> np.ndarray:
    """`k` indices spread evenly over `range(n)` (all of them when `n <= k`), first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))
