"""The toy-world scorer: does a generated video show what its prompt says, and does it move?

The world is known (pipelines/world), so a video for "a small red circle drifting to the left on a
blue background" can be checked frame by frame without any learned judge:
- the prompt is parsed with the world's vocabulary (`pipelines.evaluation.prompts`);
- per frame the background is the median colour of the border, the object the largest connected region
  far from it; its colour is the nearest named colour, its shape the nearest of templates rendered by
  the world's own `render` (a nearest-neighbour classifier on the world's images, no learned weights),
  its centroid and area come from soft coverage weights, so sub-pixel motion is measured;
- the camera's motion is the background's global shift between frames (Lucas-Kanade on the
  background pixels), measured only where the background has texture (the world's pan dots).

Per video (`evaluate_video`): prompt_faithfulness (share of frames whose shape AND colour match the
prompt), temporal_consistency (share of consecutive frame pairs showing the same object: colour, shape,
area within a factor), motion (extent of the object's/camera's trajectory, smoothness = share of steps
that are not jumps), frame_quality (sharpness against a world rendering of the same scene, and the
background's distance from the named background). `evaluate_videos` adds the means.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import decord
import numpy as np
from pydantic import Field

from model.config import ConfigBase
from pipelines.evaluation.prompts import Prompt, parse_prompt
from pipelines.watermark import watermark_mask
from pipelines.world.config import BACKGROUNDS, COLOURS, SHAPES, SIZES
from pipelines.world.shapes import render
from pipelines.world.videos import DIRECTIONS

# Blurs (px) of the templates: codecs subsample colour, so a shape that differs from its background mostly
# in hue (purple on blue) arrives blurred; it is matched against equally blurred templates.
TEMPLATE_BLURS = (0.0, 0.8, 1.4)
_GRID = 12  # side of the shape descriptor: the object's bounding box resampled to _GRID x _GRID


class EvalConfig(ConfigBase):
    """Thresholds of the toy-world evaluator. Distances are fractions of the frame side unless named."""

    min_contrast: float = Field(40.0, description="RGB distance from the background that counts as object")
    min_area: float = Field(0.002, description="smallest object, share of the frame")
    max_area: float = Field(0.35, description="largest object (world shapes stay below 0.12)")
    max_area_step: float = Field(1.3, description="area factor between frames still 'the same object'")
    min_motion: float = Field(0.05, description="trajectory extent that counts as moving")
    jump_share: float = Field(0.25, description="a step longer than this share of the extent is a jump")
    jump_factor: float = Field(4.0, description="... or longer than this many median steps")
    step_floor: float = Field(0.02, description="steps below this are never jumps (measurement noise)")
    min_smoothness: float = Field(0.9, description="share of non-jump steps for smooth motion")
    min_texture: float = Field(0.5, description="mean squared grey-level gradient (smaller eigenvalue) a background "
                               "needs to track the camera; the world's pan dots give ~4, plain colours ~0")
    max_background_error: float = Field(60.0, description="RGB distance at which background quality is 0")


# ----------------------------------------------------------------------------- one frame

@dataclass(frozen=True)
class FrameObject:
    """What one frame shows. Positions and area are fractions of the frame side / frame area."""

    found: bool
    background_rgb: tuple[float, float, float]
    shape: str | None = None
    colour: str | None = None
    colour_rgb: tuple[float, float, float] | None = None
    cx: float = math.nan
    cy: float = math.nan
    area: float = 0.0


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name], float) - rgb) ** 2)))


def _object_region(frame: np.ndarray, cfg: EvalConfig, ignore: np.ndarray | None = None):
    """(background rgb, soft coverage weights (H, W), binary mask of the object) or a None mask. Pixels in
    `ignore` (H, W) bool (an overlay such as the watermark's label) are neither background nor object."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    if ignore is not None:
        shown = ~np.concatenate([ignore[0], ignore[-1], ignore[:, 0], ignore[:, -1]])
        border = border[shown] if shown.any() else border
    background = np.median(border, axis=0)
    dist = np.linalg.norm(frame - background, axis=-1)  # (H, W)
    if ignore is not None:
        dist[ignore] = 0.0
    peak = np.percentile(dist, 99.5)
    if peak < cfg.min_contrast:
        return background, None, None
    n, labels, stats, _ = cv2.connectedComponentsWithStats((dist > peak / 2).astype(np.uint8), connectivity=8)
    if n < 2:
        return background, None, None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = labels == best
    contrast = np.percentile(dist[component], 90)
    if contrast < cfg.min_contrast:
        return background, None, None
    # The anti-aliased rim lies within one pixel of the half-coverage component.
    near = cv2.dilate(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    weights = np.where(near, np.clip(dist / contrast, 0.0, 1.0), 0.0)
    return background, weights, component


def _descriptor(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object's coverage inside its bounding box, resampled to _GRID x _GRID: translation and scale
    free, so one template per shape serves every size and position."""
    ys, xs = np.nonzero(mask)
    crop = weights[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    shrink = crop.shape[0] > _GRID or crop.shape[1] > _GRID
    return cv2.resize(crop, (_GRID, _GRID), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR).ravel()


@lru_cache(maxsize=16)
def shape_templates(side: int) -> tuple[tuple[str, np.ndarray, float], ...]:
    """(shape, descriptor, area / r^2) of the world's shapes rendered at this frame side, every size class,
    two sub-pixel offsets and `TEMPLATE_BLURS`: the nearest-neighbour 'training set' of the shape classifier."""
    cfg, templates = EvalConfig(), []
    for shape in SHAPES:
        for frac in SIZES.values():
            for offset in (0.0, 0.37):
                r = frac * side
                frame = render(side, (0, 0, 0), shape, (255, 255, 255), side / 2 + offset, side / 2 + offset, r)
                for blur in TEMPLATE_BLURS:
                    image = cv2.GaussianBlur(frame, (0, 0), blur) if blur else frame
                    _, weights, mask = _object_region(image.astype(np.float32), cfg)
                    templates.append((shape, _descriptor(weights, mask), float(weights.sum()) / r ** 2))
    return tuple(templates)


def detect_object(frame: np.ndarray, cfg: EvalConfig | None = None, ignore: np.ndarray | None = None
                  ) -> FrameObject:
    """Find the world object in one (H, W, 3) frame with values in [0, 255], not reading the pixels in
    `ignore` ((H, W) bool, e.g. `watermark_mask`): an object under an overlay is read from what shows."""
    cfg = cfg or EvalConfig()
    frame = frame.astype(np.float32)
    h, w, _ = frame.shape
    background, weights, mask = _object_region(frame, cfg, ignore)
    bg = tuple(float(c) for c in background)
    if mask is None:
        return FrameObject(found=False, background_rgb=bg)
    mass = float(weights.sum())
    if not cfg.min_area <= mass / (h * w) <= cfg.max_area:
        return FrameObject(found=False, background_rgb=bg)
    core = weights >= 0.75
    rgb = np.median(frame[core if core.any() else mask], axis=0)
    descriptor = _descriptor(weights, mask)
    shape = min(shape_templates(w), key=lambda t: float(np.sum((t[1] - descriptor) ** 2)))[0]
    ys, xs = np.mgrid[0:h, 0:w]
    return FrameObject(found=True, background_rgb=bg, shape=shape, colour=_nearest(rgb, COLOURS),
                       colour_rgb=tuple(float(c) for c in rgb),
                       cx=float((weights * (xs + 0.5)).sum() / mass / w),
                       cy=float((weights * (ys + 0.5)).sum() / mass / h), area=mass / (h * w))


def background_shift(prev: np.ndarray, cur: np.ndarray, exclude: np.ndarray, cfg: EvalConfig
                     ) -> tuple[float, float]:
    """Global shift (px, x right, y down) of the background content from `prev` to `cur`: one
    Lucas-Kanade step over the pixels outside `exclude`. (0, 0) where the background is too flat to
    tell (a plain colour shows no camera motion)."""
    g0 = cv2.GaussianBlur(prev.astype(np.float32).mean(axis=-1), (5, 5), 1.0)
    g1 = cv2.GaussianBlur(cur.astype(np.float32).mean(axis=-1), (5, 5), 1.0)
    gy, gx = np.gradient((g0 + g1) / 2)
    valid = ~exclude
    valid[:2], valid[-2:], valid[:, :2], valid[:, -2:] = False, False, False, False
    gx, gy, gt = gx[valid], gy[valid], (g1 - g0)[valid]
    a = np.array([[gx @ gx, gx @ gy], [gx @ gy, gy @ gy]])
    if gx.size == 0 or np.linalg.eigvalsh(a)[0] / gx.size < cfg.min_texture:
        return 0.0, 0.0
    dx, dy = np.linalg.solve(a, -np.array([gx @ gt, gy @ gt]))
    return float(dx), float(dy)


# ----------------------------------------------------------------------------- one video

def as_frames(video) -> np.ndarray:
    """A video as (F, H, W, 3) float32 in [0, 255]. Accepts numpy or torch; (F, H, W, 3), else (F, 3, H, W)
    when dim 1 is 3, else (3, F, H, W) (one video of the cascade's (B, C, F, H, W)); uint8 in [0, 255],
    float in [0, 1], or float with negatives, taken as [-1, 1] (a diffusion output)."""
    x = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if x.ndim == 4 and x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    elif x.ndim == 4 and x.shape[-1] != 3 and x.shape[0] == 3:
        x = x.transpose(1, 2, 3, 0)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 1:
        raise ValueError(f"a video must be (F, H, W, 3) or (F, 3, H, W) with F >= 1, got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    x = x.astype(np.float32)
    if x.min() < 0:
        x = (x + 1) / 2
    return np.clip(x, 0.0, 1.0) * 255


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else 0.0


def _consistency(objects: Sequence[FrameObject], cfg: EvalConfig) -> float:
    """Share of consecutive frame pairs that show the same object: both found, same colour name, same
    shape, area changed by less than `max_area_step`. A single frame is trivially consistent if found."""
    if len(objects) == 1:
        return float(objects[0].found)
    same = [a.found and b.found and a.colour == b.colour and a.shape == b.shape
            and max(a.area, b.area) <= cfg.max_area_step * min(a.area, b.area)
            for a, b in zip(objects, objects[1:])]
    return _share(same)


def _camera(frames: np.ndarray, objects: Sequence[FrameObject], cfg: EvalConfig,
            ignore: np.ndarray | None = None) -> np.ndarray:
    """(F, 2) cumulative background content displacement, fractions of the side (x, y)."""
    h, w = frames.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w]
    path = np.zeros((len(frames), 2))
    for i in range(1, len(frames)):
        exclude = np.zeros((h, w), bool) if ignore is None else ignore.copy()
        for o in (objects[i - 1], objects[i]):
            if o.found:  # a disc around the object, generous enough to cover its rim and blur
                radius = 1.5 * math.sqrt(o.area * h * w) + 3
                exclude |= (xs + 0.5 - o.cx * w) ** 2 + (ys + 0.5 - o.cy * h) ** 2 < radius ** 2
        dx, dy = background_shift(frames[i - 1], frames[i], exclude, cfg)
        path[i] = path[i - 1] + (dx / w, dy / h)
    return path


def _motion(frames: np.ndarray, objects: Sequence[FrameObject], prompt: Prompt, cfg: EvalConfig,
            ignore: np.ndarray | None = None) -> dict:
    """Extent and smoothness of the trajectory (cx, cy, sqrt(area), camera x, camera y) over the frames
    where the object was found, and whether it moves as the prompt says."""
    found = [i for i, o in enumerate(objects) if o.found]
    camera = _camera(frames, objects, cfg, ignore)
    if len(found) < 2:
        return {"motion_amount": 0.0, "moving": False, "motion_smoothness": 0.0, "motion_ok": False,
                "motion_match": None if prompt.motion is None else False}
    z = np.array([[objects[i].cx, objects[i].cy, math.sqrt(objects[i].area), *camera[i]] for i in found])
    extent = float(np.linalg.norm(z.max(axis=0) - z.min(axis=0)))
    steps = [float(np.linalg.norm(z[k + 1] - z[k]))
             for k in range(len(found) - 1) if found[k + 1] == found[k] + 1]  # consecutive frames only
    median = float(np.median(steps)) if steps else 0.0
    jumps = [s > cfg.step_floor and (s > cfg.jump_share * extent or s > cfg.jump_factor * median)
             for s in steps]
    smoothness = 1.0 - _share(jumps) if steps else 0.0
    moving = extent > cfg.min_motion
    return {"motion_amount": extent, "moving": moving, "motion_smoothness": smoothness,
            "motion_ok": moving and smoothness >= cfg.min_smoothness,
            "motion_match": _motion_match(z, moving, prompt, cfg)}


def _motion_match(z: np.ndarray, moving: bool, prompt: Prompt, cfg: EvalConfig) -> bool | None:
    """Does the net motion go the prompt's way? drift: the object along its direction; pan: the content
    (object and background) against the camera's direction; grow: the object's size up; bounce: moving."""
    if prompt.motion is None:
        return None
    if prompt.motion == "grow":
        return bool(z[-1, 2] > 1.25 * z[0, 2])
    if not moving or prompt.direction is None:
        return moving
    want = np.asarray(DIRECTIONS[prompt.direction])
    net = z[-1, :2] - z[0, :2]
    if prompt.motion == "pan":
        want, net = -want, net + (z[-1, 3:] - z[0, 3:])
    norm = float(np.linalg.norm(net))
    return bool(norm > cfg.min_motion and net @ want / norm > 0.7)


def _laplacian_variance(frame: np.ndarray) -> float:
    """Of the luma (BT.601): what H.264's 4:2:0 keeps at full resolution, so a decoded world video
    measures close to its own rendering."""
    luma = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(cv2.Laplacian(luma, cv2.CV_32F).var())


def _frame_quality(frame: np.ndarray, obj: FrameObject, prompt: Prompt, cfg: EvalConfig
                   ) -> tuple[float, float, float]:
    """(sharpness ratio, background error in [0, 1], quality in [0, 1]) of one frame. The sharpness
    reference is the world's own rendering of the frame's scene (prompt's shape/colour/background where
    given, the detected ones otherwise, at the detected place and size): 1 means as sharp as the world,
    below is blur, above is noise or ringing; quality counts both ways as min(ratio, 1 / ratio)."""
    named = prompt.background or _nearest(np.asarray(obj.background_rgb), BACKGROUNDS)
    background = BACKGROUNDS[named]
    bg_error = float(np.linalg.norm(np.asarray(obj.background_rgb) - background))
    if not obj.found:
        return 0.0, bg_error / (255 * math.sqrt(3)), 0.0
    side = frame.shape[1]
    shape = prompt.shape or obj.shape
    k = np.mean([t[2] for t in shape_templates(side) if t[0] == shape])  # area / r^2 of this shape
    r = math.sqrt(obj.area * side * side / k)
    colour = COLOURS.get(prompt.colour or "") or tuple(int(c) for c in obj.colour_rgb)
    camera = (0.0, 0.0) if prompt.motion == "pan" else None
    reference = render(side, background, shape, colour, obj.cx * side, obj.cy * side, r, camera=camera)
    ratio = _laplacian_variance(frame) / max(_laplacian_variance(reference), 1e-6)
    sharp = min(ratio, 1 / ratio) if ratio > 0 else 0.0
    bg_score = max(0.0, 1.0 - bg_error / cfg.max_background_error)
    return ratio, bg_error / (255 * math.sqrt(3)), sharp * bg_score


def evaluate_video(video, prompt: str, cfg: EvalConfig | None = None, ignore: np.ndarray | None = None) -> dict:
    """Score one video (any layout `as_frames` reads) against its prompt. Shares are in [0, 1]; a frame
    matches the prompt on what the prompt names (a prompt without a shape is matched on colour alone);
    None where the prompt says nothing to check (motion_match of an image caption). `ignore` (H, W) bool:
    pixels of an overlay (the watermark) that the object and camera reads leave out."""
    cfg = cfg or EvalConfig()
    frames = as_frames(video)
    if ignore is not None and ignore.shape != frames.shape[1:3]:
        raise ValueError(f"ignore mask {ignore.shape} does not match the frames' {frames.shape[1:3]}")
    parsed = parse_prompt(prompt)
    objects = [detect_object(f, cfg, ignore) for f in frames]
    shape_ok = [o.found and (parsed.shape is None or o.shape == parsed.shape) for o in objects]
    colour_ok = [o.found and (parsed.colour is None or o.colour == parsed.colour) for o in objects]
    bg_ok = [parsed.background in (None, _nearest(np.asarray(o.background_rgb), BACKGROUNDS)) for o in objects]
    quality = np.array([_frame_quality(f, o, parsed, cfg) for f, o in zip(frames, objects)])
    return {"prompt": prompt, "parsed": asdict(parsed), "n_frames": len(frames),
            "detected": _share([o.found for o in objects]),
            "shape_accuracy": _share(shape_ok), "colour_accuracy": _share(colour_ok),
            "background_accuracy": _share(bg_ok),
            "prompt_faithfulness": _share([s and c for s, c in zip(shape_ok, colour_ok)]),
            "temporal_consistency": _consistency(objects, cfg),
            **_motion(frames, objects, parsed, cfg, ignore),
            "sharpness_ratio": float(np.median(quality[:, 0])),
            "background_error": float(quality[:, 1].mean()), "frame_quality": float(quality[:, 2].mean())}


def read_back(path: str, prompt: str, cfg: EvalConfig | None = None, watermark=None) -> dict:
    """What a viewer gets from a video file (codec included): its frames decoded (decord) and scored against
    the prompt. `watermark` (a WatermarkConfig): the mark the file carries; its label's pixels are not read as
    the scene, so an object partly under it is read from what shows (with the label read, its dark box joins
    the object and a circle there reads as a triangle). {"frames", "faithful_frames" (shape and colour as the
    prompt says), "shape_frames", "colour_frames", "temporal_consistency"}."""
    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()  # (F, H, W, 3) uint8
    ignore = None
    if watermark is not None and watermark.enabled:
        ignore = watermark_mask(frames.shape[1:3], watermark)
    score = evaluate_video(frames, prompt, cfg, ignore)
    n = score["n_frames"]
    counts = {f"{key}_frames": round(score[share] * n) for key, share in
              (("faithful", "prompt_faithfulness"), ("shape", "shape_accuracy"), ("colour", "colour_accuracy"))}
    return {"frames": n, **counts, "temporal_consistency": round(score["temporal_consistency"], 4)}


def evaluate_videos(videos: Sequence, prompts: Sequence[str], cfg: EvalConfig | None = None) -> dict:
    """{"videos": one `evaluate_video` dict per video, "mean": the mean of every numeric or boolean
    score over the videos that have it (booleans as shares)}."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    if not len(videos):
        raise ValueError("no videos to evaluate")
    results = [evaluate_video(v, p, cfg) for v, p in zip(videos, prompts)]
    mean = {}
    for key, value in results[0].items():
        if isinstance(value, (bool, int, float)) or value is None:
            values = [r[key] for r in results if isinstance(r[key], (bool, int, float))]
            mean[key] = float(np.mean(values)) if values else None
    return {"videos": results, "mean": mean}
