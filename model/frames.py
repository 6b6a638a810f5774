"""Frame bookkeeping for the interpolation network F: which frames are known, where they go, which windows
F is run on, and the masks of the paper's other uses (extrapolation, image animation, two-image interpolation).

A mask is a (T,) bool tensor, True on known frames. F's extra input channels are the masked frames and the
mask, (B, C+1, T, H, W), built by `interpolation_channels` (unknown frames zeroed as in the paper, or
blended from the known ones around them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def interpolation_mask(n_known: int, frame_skip: int) -> tuple[list[int], int]:
    """n_known frames spread frame_skip apart: -> (known indices, total). 16 at skip 5 -> 0,5,...,75 of 76."""
    if n_known < 1 or frame_skip < 1:
        raise ValueError(f"need n_known >= 1 and frame_skip >= 1, got {n_known}, {frame_skip}")
    return [i * frame_skip for i in range(n_known)], (n_known - 1) * frame_skip + 1


def spread_indices(n_known: int, total: int) -> list[int]:
    """Known frames spread evenly over any target length, first and last frame included."""
    if not 1 <= n_known <= total:
        raise ValueError(f"cannot spread {n_known} known frames over {total}")
    if n_known == 1:
        return [0]
    return [round(i * (total - 1) / (n_known - 1)) for i in range(n_known)]


def mask_from_indices(known_idx: list[int], total: int) -> torch.Tensor:
    """-> (T,) bool, True at known_idx."""
    if any(not 0 <= i < total for i in known_idx):
        raise ValueError(f"known indices {known_idx} outside 0..{total - 1}")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[list(known_idx)] = True
    return mask


def extrapolation_mask(total: int, n_known: int, at: str = "start") -> torch.Tensor:
    """Known frames at one end: at='start' predicts the future, at='end' the past."""
    if at not in ("start", "end"):
        raise ValueError(f"at must be 'start' or 'end', got {at!r}")
    if not 1 <= n_known <= total:
        raise ValueError(f"cannot hold {n_known} known frames in {total}")
    idx = range(n_known) if at == "start" else range(total - n_known, total)
    return mask_from_indices(list(idx), total)


def animation_mask(total: int) -> torch.Tensor:
    """Image animation: the user's image is frame 0, the rest is generated."""
    return extrapolation_mask(total, 1, "start")


def two_image_mask(total: int) -> torch.Tensor:
    """Image interpolation: two images as first and last frames, everything between generated."""
    if total < 2:
        raise ValueError(f"two-image interpolation needs at least 2 frames, got {total}")
    return mask_from_indices([0, total - 1], total)


def place_at(frames: torch.Tensor, known_idx: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put frames (B, C, F, H, W) at known_idx of a T-frame video, zeros elsewhere.
    -> masked video (B, C, T, H, W), mask (B, 1, T, H, W) float."""
    b, c, f, h, w = frames.shape
    if len(known_idx) != f:
        raise ValueError(f"{f} frames for {len(known_idx)} known positions")
    video = frames.new_zeros(b, c, total, h, w)
    video[:, :, known_idx] = frames
    mask = mask_from_indices(known_idx, total).to(frames)[None, None, :, None, None].expand(b, 1, total, h, w)
    return video, mask.contiguous()


def place_known(frames: torch.Tensor, frame_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, C, F, H, W) placed frame_skip apart: -> (B, C, (F-1)*skip+1, H, W), (B, 1, T, H, W)."""
    known_idx, total = interpolation_mask(frames.shape[2], frame_skip)
    return place_at(frames, known_idx, total)


def linear_fill(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every unknown frame replaced by the time-linear blend of the nearest known frames before and after
    it (a copy of the nearest one past either end); known frames kept. video (B, C, T, H, W), mask (T,)."""
    known = [i for i, k in enumerate(mask.tolist()) if k]
    if not known:
        return torch.zeros_like(video)
    out = video.clone()
    for i in set(range(video.shape[2])) - set(known):
        before = max((k for k in known if k < i), default=None)
        after = min((k for k in known if k > i), default=None)
        if before is None or after is None:
            out[:, :, i] = video[:, :, after if before is None else before]
        else:
            w = (i - before) / (after - before)
            out[:, :, i] = (1 - w) * video[:, :, before] + w * video[:, :, after]
    return out


def interpolation_channels(video: torch.Tensor, mask: torch.Tensor, fill: str = "zeros") -> torch.Tensor:
    """F's extra input: the known frames and the binary mask, the unknown frames zeroed (the paper) or,
    with fill="linear", blended from their known neighbours. video (B, C, T, H, W), mask (T,) bool ->
    (B, C+1, T, H, W)."""
    b, _, t, h, w = video.shape
    if mask.shape != (t,):
        raise ValueError(f"mask must be ({t},), got {tuple(mask.shape)}")
    if fill not in ("zeros", "linear"):
        raise ValueError(f"unknown fill {fill!r}; choose zeros or linear")
    m = mask.to(video)[None, None, :, None, None].expand(b, 1, t, h, w)
    frames = linear_fill(video, mask) if fill == "linear" else video * m
    return torch.cat([frames, m], dim=1)


@dataclass(frozen=True)
class Window:
    """Frames start..stop-1 of the target, which of them are given when this window is generated, and how
    many of its leading frames are kept (the frames after them are generated but thrown away)."""

    start: int
    stop: int
    known: tuple[bool, ...]
    keep: int


def plan_windows(known: torch.Tensor, window: int) -> list[Window]:
    """Cover a T-frame target with windows of `window` frames (the trained clip length) that F generates
    one after another, left to right; frames kept from earlier windows count as known in later ones.

    A window keeps its frames up to its last known frame and the next window starts there, so every
    unknown frame is generated between the known frames around it; the frames past that last known one
    would be extrapolated while a known frame lies just beyond the window, and are dropped. A window with
    no known frame after its first keeps all its frames and the next one overlaps it by one. The last
    window is aligned to the end and keeps everything. 16 known at skip 5 (T=76), window 16 -> windows
    starting at 0, 15, 30, 45, 60, each with known 0, 5, 10, 15; 8 known at skip 3 (T=22), window 8 ->
    0, 6, 12, 14, the first three with known 0, 3, 6 like a skip-3 training window."""
    total = known.shape[0]
    if window < 2:
        raise ValueError(f"window must be >= 2 frames, got {window}")
    if total <= window:
        return [Window(0, total, tuple(known.tolist()), total)]
    done, plan, start = known.clone(), [], 0
    while start + window < total:
        ahead = [i for i in range(1, window) if done[start + i]]
        last = ahead[-1] if ahead else window - 1  # nothing known ahead: extrapolate, overlap one frame
        plan.append(Window(start, start + window, tuple(done[start:start + window].tolist()), last + 1))
        done[start:start + last + 1] = True
        start += last
    start = total - window
    plan.append(Window(start, total, tuple(done[start:].tolist()), window))
    return plan


def fill_by_windows(video: torch.Tensor, known: torch.Tensor, window: int,
                    generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run `generate(window_video (B, C, W, H, W), window_mask (W,) bool) -> (B, C, W, H, W)` over the
    plan and keep its output on the window's unknown frames up to its `keep`.
    video: (B, C, T, H, W) with known frames in place."""
    out = video.clone()
    for win in plan_windows(known, window):
        mask = torch.tensor(win.known, dtype=torch.bool)
        gen = generate(out[:, :, win.start:win.stop], mask)
        stop = win.start + win.keep
        keep = mask[:win.keep].to(out)[None, None, :, None, None]
        out[:, :, win.start:stop] = keep * out[:, :, win.start:stop] + (1 - keep) * gen[:, :, :win.keep]
    return out


def sample_train_mask(frames: int, max_skip: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A training mask for F over a `frames` window: interpolation at a random skip in 2..max_skip (the
    paper's variable frame skips), extrapolation from either end, or image animation. -> (frames,) bool."""
    if frames < 2 or max_skip < 2:
        raise ValueError(f"need frames >= 2 and max_skip >= 2, got {frames}, {max_skip}")
    kind = int(torch.randint(4, (1,), generator=generator))
    if kind <= 1:
        skip = int(torch.randint(2, max_skip + 1, (1,), generator=generator))
        return mask_from_indices(list(range(0, frames, skip)), frames)
    if kind == 2:
        n = int(torch.randint(1, frames, (1,), generator=generator))
        at = "start" if int(torch.randint(2, (1,), generator=generator)) == 0 else "end"
        return extrapolation_mask(frames, n, at)
    return animation_mask(frames)
