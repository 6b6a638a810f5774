"""Writing a generated video as a viewer gets it: watermarked mp4 (H.264), GIF and frame grid, with a JSON
sidecar saying how it was made."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.watermark import WatermarkConfig, apply_watermark

FFMPEG = "/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").is_file() else (shutil.which("ffmpeg") or "ffmpeg")


def write_mp4(frames: np.ndarray, path: Path, fps: float) -> Path:
    """H.264 (libx264, yuv420p) through ffmpeg; odd sizes are padded to even, as yuv420p needs."""
    f, h, w, _ = frames.shape
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", f"{fps:.6g}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-movflags", "+faststart", str(path)]
    done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {done.stderr.decode(errors='replace').strip()}")
    return path


def write_gif(frames: np.ndarray, path: Path, fps: float) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    duration = max(20, round(1000 / fps))  # viewers slow frames shorter than 20 ms down to 100 ms
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def write_grid(frames: np.ndarray, path: Path, columns: int = 8) -> Path:
    """All frames tiled row by row, `columns` per row."""
    f, h, w, c = frames.shape
    cols = min(columns, f)
    rows = math.ceil(f / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = frame
    Image.fromarray(grid).save(path)
    return path


def write_outputs(video: np.ndarray, out_dir: str | Path, name: str, fps: float,
                  watermark_cfg: WatermarkConfig | None, sidecar: dict) -> dict[str, Path]:
    """video (F, H, W, 3) uint8 (an array or a CPU tensor) -> <name>.mp4, .gif, .grid.png and .json in
    out_dir, watermarked unless `watermark_cfg` is None or disabled. The sidecar gets the file names and the
    watermark settings."""
    frames = video.numpy() if hasattr(video, "numpy") else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark = watermark_cfg or WatermarkConfig(enabled=False)
    frames = apply_watermark(frames, mark)
    paths = {"mp4": write_mp4(frames, out / f"{name}.mp4", fps), "gif": write_gif(frames, out / f"{name}.gif", fps),
             "grid": write_grid(frames, out / f"{name}.grid.png")}
    meta = {**sidecar, "files": {k: p.name for k, p in paths.items()},
            "watermark": mark.model_dump(mode="json") if mark.enabled else {"enabled": False}}
    paths["json"] = out / f"{name}.json"
    paths["json"].write_text(json.dumps(meta, indent=2, default=str))
    return paths
