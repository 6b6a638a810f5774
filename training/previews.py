"""Previews of a stage while it trains, logged to its MLflow run: metrics as metrics, images as a PNG
strip, videos as a GIF (`samples/step_NNNNNNN.png|gif`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.tracker import Tracker


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_strip(images: torch.Tensor) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one image, side by side."""
    return Image.fromarray(torch.cat(list(_uint8(images)), dim=2).permute(1, 2, 0).numpy())


def write_preview(preview: dict[str, Any], folder: Path, tracker: Tracker, step: int) -> None:
    """Previews to MLflow: metrics as metrics, images as a PNG strip, videos as a GIF."""
    if "metrics" in preview:
        tracker.log_metrics(preview["metrics"], step)
        return
    folder.mkdir(parents=True, exist_ok=True)
    if "images" in preview:
        path = folder / f"step_{step:07d}.png"
        image_strip(preview["images"]).save(path)
    else:
        video = preview["video"]  # (N, 3, F, H, W)
        frames = [image_strip(video[:, :, f]) for f in range(video.shape[2])]
        path = folder / f"step_{step:07d}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    tracker.log_artifact(str(path), "samples")
