"""Moving shapes: the motions (drift, bounce, grow, camera pan), their per-frame truth, and H.264
encoding through the `ffmpeg` binary.

Trajectories are in fractions of the frame side, `(0, 0)` the top left corner, so the truth of a
video holds at any resolution it is decoded at.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from pipelines.world.shapes import HALF_EXTENT, render

# Compass directions (x right, y down) as unit vectors, and how a caption says them.
_D = 0.5 ** 0.5
DIRECTIONS: dict[str, tuple[float, float]] = {
    "to the right": (1.0, 0.0), "to the left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up and to the right": (_D, -_D), "up and to the left": (-_D, -_D),
    "down and to the right": (_D, _D), "down and to the left": (-_D, _D),
}
PAN_DIRECTIONS = ("to the right", "to the left", "up", "down")


def caption_directions(motion: str) -> tuple[str, ...]:
    """The directions a caption of `motion` can name: a pan goes along an axis, a drift any compass way."""
    return PAN_DIRECTIONS if motion == "pan" else tuple(DIRECTIONS)


def _fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect `x` into [lo, hi] as a ball bouncing between two walls would be."""
    span = hi - lo
    t = np.mod(x - lo, 2 * span)
    return lo + np.where(t <= span, t, 2 * span - t)


def sample_motion(rng: np.random.Generator, motion: str, shape: str, size_frac: float,
                  large_frac: float, small_frac: float, travel: tuple[float, float] = (0.2, 0.45)) -> dict:
    """Parameters of one motion, as JSON-ready numbers (fractions of the side, per second). A drift or pan
    covers a distance drawn from `travel` over the video (less where the shape has no room for it); a growing
    shape goes from `small_frac` to `large_frac`."""
    extent = HALF_EXTENT[shape]
    if motion == "grow":
        lo, hi = extent * large_frac, 1 - extent * large_frac
        return {"start": [float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))],
                "r_start": small_frac, "r_end": large_frac}
    lo, hi = extent * size_frac, 1 - extent * size_frac
    if motion == "bounce":
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.4, 0.8)
        return {"start": [float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))],
                "velocity": [float(speed * np.cos(angle)), float(speed * np.sin(angle))], "r": size_frac,
                "walls": [lo, hi]}  # the range of the centre: where the shape touches the frame
    names = caption_directions(motion)
    direction = names[rng.integers(len(names))]
    ux, uy = DIRECTIONS[direction]
    room = (hi - lo) * 0.9
    travel = rng.uniform(min(travel[0], room), min(travel[1], room))
    # For a pan the object moves against the camera; either way it must stay inside the frame.
    sign = -1.0 if motion == "pan" else 1.0
    end_dx, end_dy = sign * ux * travel, sign * uy * travel
    start = [float(rng.uniform(max(lo, lo - d), min(hi, hi - d))) for d in (end_dx, end_dy)]
    return {"start": start, "direction": direction, "travel": float(travel), "r": size_frac}


def trajectory(motion: str, params: dict, n_frames: int, fps: int) -> dict[str, np.ndarray]:
    """Per frame: the shape's centre and size in the frame, and the camera's offset in the world."""
    t = np.arange(n_frames) / fps
    s = t / max(t[-1], 1e-9)  # 0..1 over the video
    x0, y0 = params["start"]
    cam_x = np.zeros(n_frames)
    cam_y = np.zeros(n_frames)
    if motion == "grow":
        cx, cy = np.full(n_frames, x0), np.full(n_frames, y0)
        r = params["r_start"] + (params["r_end"] - params["r_start"]) * s
        return {"cx": cx, "cy": cy, "r": r, "camera_x": cam_x, "camera_y": cam_y}
    r = np.full(n_frames, params["r"])
    if motion == "bounce":
        lo, hi = params["walls"]
        cx = _fold(x0 + params["velocity"][0] * t, lo, hi)
        cy = _fold(y0 + params["velocity"][1] * t, lo, hi)
        return {"cx": cx, "cy": cy, "r": r, "camera_x": cam_x, "camera_y": cam_y}
    ux, uy = DIRECTIONS[params["direction"]]
    dist = params["travel"] * s
    if motion == "drift":
        return {"cx": x0 + ux * dist, "cy": y0 + uy * dist, "r": r, "camera_x": cam_x, "camera_y": cam_y}
    if motion == "pan":
        cam_x, cam_y = ux * dist, uy * dist
        return {"cx": x0 - cam_x, "cy": y0 - cam_y, "r": r, "camera_x": cam_x, "camera_y": cam_y}
    raise ValueError(f"unknown motion {motion!r}")


def render_video(size: int, background: tuple[int, int, int], shape: str, colour: tuple[int, int, int],
                 motion: str, track: dict[str, np.ndarray]) -> np.ndarray:
    """All frames, `(F, size, size, 3)` uint8."""
    n = len(track["cx"])
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        camera = (track["camera_x"][i] * size, track["camera_y"][i] * size) if motion == "pan" else None
        frames[i] = render(size, background, shape, colour, track["cx"][i] * size, track["cy"][i] * size,
                           track["r"][i] * size, camera=camera)
    return frames


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise RuntimeError("the toy world encodes videos with the `ffmpeg` binary; install it (Debian: ffmpeg)")
    return found


def encode_mp4(frames: np.ndarray, path: Path, fps: int, gop: int, crf: int) -> None:
    """H.264 mp4 with a keyframe every `gop` frames (clipping needs keyframes inside each clip).

    One encoder thread and bit-exact flags keep the bytes identical for identical frames.
    """
    n, h, w, _ = frames.shape
    cmd = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
           "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-threads", "1",
           "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", str(path)]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed on {path.name}: {proc.stderr.decode(errors='replace')[-500:]}")
