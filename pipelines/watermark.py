"""A visible watermark on every generated frame: a text (default "Make-A-Video (generated)") or a logo,
in one corner, on a dark translucent box so it reads on any background.

The mark is sized from the frame: text height is `scale` of the shorter side but never below `min_px`,
and the text wraps onto more lines (or shrinks, down to `min_px`) when it would be wider than the frame,
so it stays legible from 64 px to 768 px. It is rendered once per video as an RGBA layer (Pillow) and
alpha-composited onto each frame; `watermark_mask` says which pixels it covers.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from model.config import ConfigBase

DEFAULT_TEXT = "Make-A-Video (generated)"


class WatermarkConfig(ConfigBase):
    enabled: bool = True
    text: str = Field(DEFAULT_TEXT, min_length=1)
    logo_path: str | None = Field(None, description="an image file drawn instead of the text")
    position: Literal["top-left", "top-right", "bottom-left", "bottom-right"] = "bottom-right"
    scale: float = Field(0.03, gt=0, le=0.5, description="text height as a fraction of the frame's shorter side")
    min_px: int = Field(8, ge=4, description="smallest text height in pixels (legibility at 64 px)")
    opacity: float = Field(0.75, gt=0, le=1, description="opacity of the box behind the text, and of a logo")
    margin: float = Field(0.02, ge=0, le=0.2, description="distance to the frame's edges, fraction of the shorter side")


@lru_cache(maxsize=32)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (no font files needed); its bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than the line stays on its own line."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(draw, f"{lines[-1]} {word}", font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [text]


def _layout(height: int, width: int, cfg: WatermarkConfig) -> tuple[int, list[str]]:
    """Text size and lines: the configured size, wrapped to the frame, shrunk towards min_px while a
    line is still too wide or the block taller than a third of the frame."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    short = min(height, width)
    max_w = max(1, width - 2 * round(cfg.margin * short) - 2 * _pad(cfg.min_px))
    px = max(cfg.min_px, round(cfg.scale * short))
    while True:
        font = _font(px)
        lines = _wrap(draw, cfg.text, font, max_w)
        too_wide = max(_text_width(draw, line, font) for line in lines) > max_w
        too_tall = len(lines) * _line_height(px) > height / 3
        if px <= cfg.min_px or not (too_wide or too_tall):
            return px, lines
        px -= 1


def _pad(px: int) -> int:
    return max(1, round(px * 0.3))


def _line_height(px: int) -> int:
    return round(px * 1.25)


def _corner(height: int, width: int, box_h: int, box_w: int, cfg: WatermarkConfig) -> tuple[int, int]:
    """Top-left (x, y) of a box_w x box_h box in the configured corner, `margin` from the edges."""
    m = round(cfg.margin * min(height, width))
    x = m if cfg.position.endswith("left") else width - box_w - m
    y = m if cfg.position.startswith("top") else height - box_h - m
    return max(0, x), max(0, y)


def _text_layer(height: int, width: int, cfg: WatermarkConfig) -> Image.Image:
    px, lines = _layout(height, width, cfg)
    font, pad, line_h = _font(px), _pad(px), _line_height(px)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_w = max(_text_width(probe, line, font) for line in lines)
    box_w, box_h = min(width, text_w + 2 * pad), min(height, len(lines) * line_h + 2 * pad)
    x, y = _corner(height, width, box_h, box_w, cfg)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)  # text ink is blended over the box (alpha included) by its glyph mask
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=(0, 0, 0, round(255 * cfg.opacity)))
    for i, line in enumerate(lines):
        left, top, _, _ = draw.textbbox((0, 0), line, font=font)
        draw.text((x + pad - left, y + pad + i * line_h - top + (line_h - px) // 2), line, font=font,
                  fill=(255, 255, 255, 255))
    return layer


def _logo_layer(height: int, width: int, cfg: WatermarkConfig) -> Image.Image:
    path = Path(cfg.logo_path or "")
    if not path.is_file():
        raise FileNotFoundError(f"watermark logo not found: {path}")
    logo = Image.open(path).convert("RGBA")
    short = min(height, width)
    target_h = min(height, max(2 * cfg.min_px, round(2.5 * cfg.scale * short)))
    target_w = min(width, max(1, round(logo.width * target_h / logo.height)))
    logo = logo.resize((target_w, target_h), Image.Resampling.LANCZOS)
    alpha = np.asarray(logo.getchannel("A"), dtype=np.float32) * cfg.opacity
    logo.putalpha(Image.fromarray(alpha.round().astype(np.uint8)))
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    layer.paste(logo, _corner(height, width, target_h, target_w, cfg))
    return layer


def watermark_layer(size: tuple[int, int], cfg: WatermarkConfig) -> np.ndarray:
    """The watermark as an RGBA array (H, W, 4) uint8 for frames of size (height, width)."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {size}")
    layer = _logo_layer(height, width, cfg) if cfg.logo_path else _text_layer(height, width, cfg)
    return np.asarray(layer)


def watermark_mask(size: tuple[int, int], cfg: WatermarkConfig) -> np.ndarray:
    """(H, W) bool: the pixels the watermark changes in frames of size (height, width)."""
    return watermark_layer(size, cfg)[..., 3] > 0


def apply_watermark(frames: np.ndarray, cfg: WatermarkConfig) -> np.ndarray:
    """Composite the watermark onto every frame: frames (F, H, W, 3) uint8 -> the same, marked.
    With cfg.enabled False the frames come back unchanged."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if not cfg.enabled:
        return frames
    layer = watermark_layer(frames.shape[1:3], cfg).astype(np.float32)
    alpha = layer[..., 3:] / 255.0  # (H, W, 1)
    marked = frames.astype(np.float32) * (1 - alpha) + layer[..., :3] * alpha
    return marked.round().clip(0, 255).astype(np.uint8)
