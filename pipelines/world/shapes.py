"""Drawing the toy world: anti-aliased shapes from signed distances, in numpy only.

A shape is given by its centre `(cx, cy)` and its size `r` (half-extent class, in pixels); `(cx, cy)`
is the shape's area centroid, so an evaluator can recover it as the mean of the shape's pixels.
Coverage of a pixel is `clip(0.5 - signed_distance, 0, 1)`: one pixel of anti-aliasing, exact for
straight edges and circles, and deterministic (no rasteriser state).
"""
from __future__ import annotations

import numpy as np

# Axis-aligned half-extent of each shape as a multiple of `r`: how far it reaches from its centre.
HALF_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.2, "diamond": 1.1, "cross": 1.0}
_SQRT2 = 2.0 ** 0.5  # Python floats keep float32 arrays float32
_SIN60 = 3.0 ** 0.5 / 2


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px, negative inside) of offsets `(dx, dy)` from the shape's centre."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - HALF_EXTENT["square"] * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - HALF_EXTENT["diamond"] * r) / _SQRT2
    if shape == "triangle":
        # Equilateral, pointing up (y down), centroid at the origin; inradius = circumradius / 2.
        radius = HALF_EXTENT["triangle"] * r
        sides = np.maximum(-_SIN60 * dx - 0.5 * dy, _SIN60 * dx - 0.5 * dy)
        return np.maximum(dy, sides) - radius / 2
    if shape == "cross":
        arm = 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return np.minimum(np.maximum(ax - r, ay - arm), np.maximum(ax - arm, ay - r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(HALF_EXTENT)}")


def _blend(canvas: np.ndarray, coverage: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """In place: canvas <- canvas + coverage * (rgb - canvas)."""
    canvas += coverage[..., None] * (np.asarray(rgb, dtype=np.float32) - canvas)


def marker_rgb(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A faint shade of the background: lighter on dark backgrounds, darker on light ones."""
    shift = 40 if sum(background) < 3 * 128 else -40
    return tuple(int(np.clip(c + shift, 0, 255)) for c in background)  # type: ignore[return-value]


def render(size: int, background: tuple[int, int, int], shape: str, colour: tuple[int, int, int],
           cx: float, cy: float, r: float, *, camera: tuple[float, float] | None = None) -> np.ndarray:
    """One frame, `(size, size, 3)` uint8. Positions in pixels of this frame.

    `camera`: the frame's offset in the world (px). When given, a faint lattice of dots fixed in the
    world is drawn behind the shape, so that a camera pan is visible as motion of the background.
    """
    centres = np.arange(size, dtype=np.float32) + 0.5
    if camera is None:
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:] = background
    else:
        # The dots repeat every `spacing` px: draw one tile and repeat it.
        spacing = max(4, size // 4)
        tile_centres = np.arange(spacing, dtype=np.float32) + 0.5
        mx = np.mod(tile_centres + camera[0], spacing) - spacing / 2
        my = np.mod(tile_centres + camera[1], spacing) - spacing / 2
        d = np.hypot(mx[None, :], my[:, None]) - max(1.0, size / 40)
        tile = np.empty((spacing, spacing, 3), dtype=np.float32)
        tile[:] = background
        _blend(tile, np.clip(0.5 - d, 0.0, 1.0), marker_rgb(background))
        repeats = -(-size // spacing)
        frame = np.tile(np.rint(tile).astype(np.uint8), (repeats, repeats, 1))[:size, :size]
    # Only the shape's bounding box (plus the anti-aliasing pixel) can be covered.
    reach = HALF_EXTENT[shape] * r + 1.5
    x0, x1 = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)))
    if x0 < x1 and y0 < y1:
        dx = (centres[x0:x1] - np.float32(cx))[None, :]
        dy = (centres[y0:y1] - np.float32(cy))[:, None]
        coverage = np.clip(0.5 - signed_distance(shape, dx, dy, np.float32(r)), 0.0, 1.0)
        box = frame[y0:y1, x0:x1].astype(np.float32)
        _blend(box, coverage, colour)
        frame[y0:y1, x0:x1] = np.rint(box)
    return frame
