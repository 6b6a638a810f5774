"""The paper's four uses of the cascade, each a short chain of `model.cascade_stages` calls:
- `text_to_video`: prompts -> P -> Dt -> F -> SR_l -> SR_h;
- `animate_image`: the image's CLIP embedding is the condition and the image is held as frame 0 while F
  extrapolates the base clip (`frames.animation_mask`);
- `interpolate_images`: two images as first and last frames, F generates the frames between;
- `vary_video`: the mean CLIP embedding of a video's frames replaces the prior's output.
The base video of every use is stored under "temporal" (for animation and interpolation F makes it).
Each stops after `stop_at` and returns a `CascadeOutput` with every stage's seed, fps and wall time.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as Fn

from model.cascade import STAGE_ORDER, Cascade, CascadeOutput, stage_seed, stop_index
from model.cascade_stages import (ProgressBar, image_embedding, interpolate_frames, sample_masked, sample_prior,
                                  sample_temporal, super_resolve_high, super_resolve_low, text_embedding,
                                  video_embedding)
from model.frames import animation_mask, mask_from_indices, plan_windows, spread_indices, two_image_mask

Progress = bool | Callable[[str, int], ProgressBar]  # True: tqdm; a callable: (stage, total steps) -> bar


def _bar(progress: Progress, stage: str, total: int) -> ProgressBar | None:
    if progress is False:
        return None
    if progress is True:
        from tqdm.auto import tqdm  # only when asked: keeps the import optional

        return tqdm(total=total, desc=stage, leave=False)
    return progress(stage, total)


class _Run:
    """Bookkeeping of one call: which stages run, each stage's generator, bar and wall time."""

    def __init__(self, cascade: Cascade, seed: int, stop_at: str | None, progress: Progress) -> None:
        self.cascade, self.seed, self.progress = cascade, seed, progress
        self.last = stop_index(stop_at)
        self.out = CascadeOutput()

    def wants(self, stage: str) -> bool:
        return STAGE_ORDER.index(stage) <= self.last

    def stage(self, stage: str, steps: int, fn: Callable[[torch.Generator, ProgressBar | None], torch.Tensor],
              fps: float | None = None) -> torch.Tensor:
        seed = stage_seed(self.seed, stage)
        generator = torch.Generator().manual_seed(seed)
        bar = _bar(self.progress, stage, steps)
        started = time.perf_counter()
        with torch.no_grad():
            result = fn(generator, bar)
        if self.cascade.device.type == "cuda":
            torch.cuda.synchronize(self.cascade.device)
        if bar is not None:
            bar.close()
        self.out.timings_s[stage] = time.perf_counter() - started
        self.out.outputs[stage], self.out.seeds[stage] = result, seed
        if fps is not None:
            self.out.fps[stage] = float(fps)
        return result


def _steps(cascade: Cascade, net: str, times: int = 1) -> int:
    return getattr(cascade.cfg, net).sampler.steps * times


def _upsample(run: _Run, base: torch.Tensor, emb: torch.Tensor, fps: float,
              target_frames: int | None) -> CascadeOutput:
    """The shared tail of every use: F to the target length, then SR_l and SR_h."""
    cascade, s = run.cascade, run.cascade.cfg.shape
    if not run.wants("interpolation"):
        return run.out
    target = target_frames or s.interpolated_frames
    if target < base.shape[2]:
        raise ValueError(f"target_frames {target} is fewer than the {base.shape[2]} frames generated")
    fps_out = fps * (target - 1) / max(base.shape[2] - 1, 1)  # the interpolated video's frame rate
    windows = len(plan_windows(mask_from_indices(spread_indices(base.shape[2], target), target), s.frames))
    video = run.stage("interpolation", _steps(cascade, "interpolation", windows),
                      lambda g, bar: interpolate_frames(cascade, base, target, emb, fps_out, g, bar), fps_out)
    if run.wants("sr_low"):
        video = run.stage("sr_low", _steps(cascade, "sr_low"),
                          lambda g, bar: super_resolve_low(cascade, video, emb, fps_out, g, bar), fps_out)
    if run.wants("sr_high"):
        run.stage("sr_high", _steps(cascade, "sr_high"),
                  lambda g, bar: super_resolve_high(cascade, video, emb, g, bar), fps_out)
    return run.out


def _embedding_stage(run: _Run, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """"prior" for the image/video uses: a CLIP embedding of pixels, no sampling (steps 0, no seed)."""
    started = time.perf_counter()
    with torch.no_grad():
        emb = fn()
    run.out.outputs["prior"], run.out.timings_s["prior"] = emb, time.perf_counter() - started
    return emb


def text_to_video(cascade: Cascade, prompts: Sequence[str], fps: float, seed: int, stop_at: str | None = None,
                  target_frames: int | None = None, progress: Progress = True) -> CascadeOutput:
    """The paper's main use: prompts -> P -> Dt -> F -> SR_l -> SR_h, stopping after `stop_at`."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    run = _Run(cascade, seed, stop_at, progress)
    emb = run.stage("prior", _steps(cascade, "prior"), lambda g, bar: sample_prior(cascade, prompts, g, bar))
    if not run.wants("temporal"):
        return run.out
    ranked = cascade.cfg.temporal.candidates > 1 or cascade.cfg.temporal.keyframe_draws > 1
    target = text_embedding(cascade, prompts) if ranked else None
    base = run.stage("temporal", _steps(cascade, "temporal"),
                     lambda g, bar: sample_temporal(cascade, emb, fps, g, bar, target), fps)
    return _upsample(run, base, emb, fps, target_frames)


def to_base(cascade: Cascade, images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) -> (B, C, base, base), antialiased like the training data's resizing."""
    size = cascade.cfg.shape.base_size
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    out = Fn.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(-1, 1).to(cascade.device)


def _held_frames(run: _Run, frames: Mapping[int, torch.Tensor], known: torch.Tensor, emb: torch.Tensor,
                 fps: float) -> torch.Tensor:
    """The base clip made by F with the given frames (index -> (B, C, base, base)) held in place."""
    cascade, s = run.cascade, run.cascade.cfg.shape
    first = next(iter(frames.values()))
    video = first.new_zeros(first.shape[0], s.channels, s.frames, s.base_size, s.base_size)  # (B, C, F, H, W)
    for index, frame in frames.items():
        video[:, :, index] = frame
    return run.stage("temporal", _steps(cascade, "interpolation"),
                     lambda g, bar: sample_masked(cascade, video, known, emb, fps, g, bar), fps)


def animate_image(cascade: Cascade, image: torch.Tensor, fps: float, seed: int, stop_at: str | None = None,
                  target_frames: int | None = None, progress: Progress = True) -> CascadeOutput:
    """Image animation: image (B, C, H, W) in [-1, 1] is the condition (its CLIP embedding) and frame 0;
    F extrapolates the other frames of the base clip, then the usual tail."""
    run = _Run(cascade, seed, stop_at, progress)
    emb = _embedding_stage(run, lambda: image_embedding(cascade, image))
    if not run.wants("temporal"):
        return run.out
    base = _held_frames(run, {0: to_base(cascade, image)}, animation_mask(cascade.cfg.shape.frames), emb, fps)
    return _upsample(run, base, emb, fps, target_frames)


def interpolate_images(cascade: Cascade, image_a: torch.Tensor, image_b: torch.Tensor, fps: float, seed: int,
                       stop_at: str | None = None, target_frames: int | None = None,
                       progress: Progress = True) -> CascadeOutput:
    """Image interpolation: image_a and image_b (B, C, H, W) in [-1, 1] are the first and last frames,
    conditioned on their mean CLIP embedding; F generates the frames between."""
    run = _Run(cascade, seed, stop_at, progress)
    both = torch.stack([image_a, image_b], dim=2)  # (B, C, 2, H, W)
    emb = _embedding_stage(run, lambda: video_embedding(cascade, both))
    if not run.wants("temporal"):
        return run.out
    frames = cascade.cfg.shape.frames
    held = {0: to_base(cascade, image_a), frames - 1: to_base(cascade, image_b)}
    base = _held_frames(run, held, two_image_mask(frames), emb, fps)
    return _upsample(run, base, emb, fps, target_frames)


def vary_video(cascade: Cascade, video: torch.Tensor, fps: float, seed: int, stop_at: str | None = None,
               target_frames: int | None = None, progress: Progress = True) -> CascadeOutput:
    """Video variation: the mean CLIP embedding of video (B, C, F, H, W) in [-1, 1] replaces the prior's
    output; Dt and the rest of the cascade generate a new video from it (with `temporal.candidates` k, the
    one of k whose frames are closest to that embedding)."""
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, F, H, W), got {tuple(video.shape)}")
    run = _Run(cascade, seed, stop_at, progress)
    emb = _embedding_stage(run, lambda: video_embedding(cascade, video))
    if not run.wants("temporal"):
        return run.out
    base = run.stage("temporal", _steps(cascade, "temporal"),
                     lambda g, bar: sample_temporal(cascade, emb, fps, g, bar, target=emb), fps)
    return _upsample(run, base, emb, fps, target_frames)
