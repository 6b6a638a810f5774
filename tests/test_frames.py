"""Frame bookkeeping of interpolation and extrapolation: 16 -> 76 at skip 5, windows, masks."""
from __future__ import annotations

import pytest
import torch

from model.config import cascade_preset
from model.frames import (
    animation_mask,
    extrapolation_mask,
    fill_by_windows,
    interpolation_channels,
    interpolation_mask,
    mask_from_indices,
    place_at,
    place_known,
    plan_windows,
    sample_train_mask,
    spread_indices,
    two_image_mask,
)


def test_paper_interpolation_arithmetic() -> None:
    known, total = interpolation_mask(16, 5)
    assert total == 76 == cascade_preset("paper").shape.interpolated_frames
    assert known == list(range(0, 76, 5))
    assert interpolation_mask(4, 2) == ([0, 2, 4, 6], 7)
    assert interpolation_mask(1, 5) == ([0], 1)
    tiny = cascade_preset("tiny").shape
    assert interpolation_mask(tiny.frames, tiny.frame_skip)[1] == tiny.interpolated_frames
    with pytest.raises(ValueError):
        interpolation_mask(16, 0)


def test_place_known() -> None:
    frames = torch.arange(1, 5, dtype=torch.float32).reshape(1, 1, 4, 1, 1).expand(2, 3, 4, 2, 2)
    video, mask = place_known(frames, 3)
    assert video.shape == (2, 3, 10, 2, 2) and mask.shape == (2, 1, 10, 2, 2)
    assert video[0, 0, :, 0, 0].tolist() == [1, 0, 0, 2, 0, 0, 3, 0, 0, 4]
    assert mask[1, 0, :, 1, 1].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="known positions"):
        place_at(frames, [0, 1], 5)


def test_spread_to_other_lengths() -> None:
    assert spread_indices(16, 76) == list(range(0, 76, 5))
    idx = spread_indices(16, 40)
    assert idx[0] == 0 and idx[-1] == 39 and len(set(idx)) == 16 and idx == sorted(idx)
    assert spread_indices(16, 16) == list(range(16))
    with pytest.raises(ValueError):
        spread_indices(17, 16)


def test_windows_for_paper_interpolation() -> None:
    known = mask_from_indices(*interpolation_mask(16, 5))
    plan = plan_windows(known, window=16)
    assert [(w.start, w.stop) for w in plan] == [(0, 16), (15, 31), (30, 46), (45, 61), (60, 76)]
    for w in plan:  # every window looks like a skip-5 training window
        assert [i for i, k in enumerate(w.known) if k] == [0, 5, 10, 15]


def _source_windows(known: torch.Tensor, plan) -> dict[int, object]:
    """Which window's output each unknown frame of the target is taken from."""
    source, done = {}, known.clone()
    for w in plan:
        for i in range(w.keep):
            if not done[w.start + i]:
                source[w.start + i] = w
        done[w.start:w.start + w.keep] = True
    return source


@pytest.mark.parametrize("frames,total,window", [(8, 22, 8), (8, 40, 8), (16, 17, 16), (16, 100, 16), (4, 16, 6)])
def test_windows_interpolate_every_frame_between_known_ones(frames, total, window) -> None:
    """Each unknown frame comes from a window holding a known frame on both sides of it (never extrapolated
    while a key frame lies just past the window), every window has the trained length, all frames covered."""
    known = mask_from_indices(spread_indices(frames, total), total)
    plan = plan_windows(known, window)
    assert all(w.stop - w.start == window for w in plan)
    assert plan[0].start == 0 and plan[-1].stop == total and plan[-1].keep == window
    source = _source_windows(known, plan)
    assert sorted(source) == [i for i in range(total) if not known[i]]
    for frame, w in source.items():
        inside = [w.start + i for i, k in enumerate(w.known) if k]
        assert min(inside) < frame < max(inside)


def test_windows_of_the_toy_shape_look_like_training_windows() -> None:
    """8 key frames to 22 (skip 3), window 8: the first windows hold frames 0, 3, 6 known - the mask of a
    skip-3 training clip - where the old fixed-stride plan asked F to extrapolate frame 7 past key frame 9."""
    known = mask_from_indices(spread_indices(8, 22), 22)
    plan = plan_windows(known, 8)
    assert [(w.start, w.keep) for w in plan] == [(0, 7), (6, 7), (12, 7), (14, 8)]
    assert all(w.known == tuple(mask_from_indices([0, 3, 6], 8).tolist()) for w in plan[:3])
    assert [(w.start, w.stop) for w in plan_windows(two_image_mask(10), 16)] == [(0, 10)]
    with pytest.raises(ValueError, match="window"):
        plan_windows(two_image_mask(40), 1)


def test_windows_extrapolate_across_gaps_longer_than_a_window() -> None:
    """Two known frames 39 apart, window 16: windows keep all they make and overlap by one frame."""
    plan = plan_windows(two_image_mask(40), 16)
    assert [(w.start, w.keep) for w in plan] == [(0, 16), (15, 16), (24, 16)]
    assert sorted(_source_windows(two_image_mask(40), plan)) == list(range(1, 39))


def test_fill_by_windows_keeps_known_frames() -> None:
    known = mask_from_indices(*interpolation_mask(4, 5))  # 16 frames, window 6
    video = torch.zeros(1, 1, 16, 1, 1)
    video[:, :, known] = 7.0
    calls = []

    def generate(window_video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append(mask.clone())
        return torch.full_like(window_video, float(len(calls)))

    out = fill_by_windows(video, known, window=6, generate=generate)
    values = out[0, 0, :, 0, 0]
    assert (values[known] == 7.0).all()
    assert not (values == 0).any()  # every unknown frame was generated
    assert values[1:5].tolist() == [1.0] * 4 and values[6:10].tolist() == [2.0] * 4  # window 1 keeps 0..5
    assert [m.tolist() for m in calls] == [[True, False, False, False, False, True]] * 3


def test_extrapolation_animation_and_two_image_masks() -> None:
    assert extrapolation_mask(6, 2).tolist() == [True, True, False, False, False, False]
    assert extrapolation_mask(6, 2, at="end").tolist() == [False, False, False, False, True, True]
    assert animation_mask(4).tolist() == [True, False, False, False]
    assert two_image_mask(5).tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError):
        extrapolation_mask(4, 5)
    with pytest.raises(ValueError):
        extrapolation_mask(4, 1, at="middle")


def test_interpolation_channels() -> None:
    video = torch.ones(2, 3, 4, 2, 2)
    extra = interpolation_channels(video, animation_mask(4))
    assert extra.shape == (2, 4, 4, 2, 2)
    assert extra[:, :3, 0].eq(1).all() and extra[:, :3, 1:].eq(0).all()
    assert extra[:, 3, 0].eq(1).all() and extra[:, 3, 1:].eq(0).all()
    with pytest.raises(ValueError, match="mask"):
        interpolation_channels(video, animation_mask(5))


def test_linear_fill_blends_the_known_neighbours() -> None:
    """Frames 0 and 3 known (values 0 and 3): 1 and 2 become 1 and 2; past the last known frame, a copy."""
    video = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1, 1).expand(2, 3, 6, 2, 2).clone()
    mask = torch.tensor([True, False, False, True, False, False])
    extra = interpolation_channels(video * 7, mask, "linear")  # the known values are 0 and 21
    assert extra[:, :3, :4].allclose(video[:, :, :4] * 7)
    assert extra[:, :3, 4:].eq(21).all()
    assert extra[:, 3].eq(mask.float()[None, :, None, None]).all()
    assert interpolation_channels(video, torch.zeros(6, dtype=torch.bool), "linear")[:, :3].eq(0).all()
    with pytest.raises(ValueError, match="fill"):
        interpolation_channels(video, mask, "nearest")


def test_sample_train_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = [sample_train_mask(16, 5, gen) for _ in range(200)]
    assert all(m.shape == (16,) and m.any() and not m.all() for m in masks)
    kinds = {tuple(m.tolist()) for m in masks}
    assert tuple(animation_mask(16).tolist()) in kinds
    assert tuple(mask_from_indices([0, 5, 10, 15], 16).tolist()) in kinds
    assert len(kinds) > 5
