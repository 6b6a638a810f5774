"""Training clips: the fps schedule, frame indices, decord decoding, and the shard readers."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import decord
import numpy as np
import pytest
from _shared import shared_file
import torch

from training.loaders.clips import (
    ClipDataset,
    FpsSchedule,
    clip_batches,
    clip_indices,
    decode_clip,
    iter_ray_clips,
    ray_clip_dataset,
    sample_fps,
)

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"


def _real_video() -> Path:
    return shared_file("test_video.mp4")


def _ffmpeg(*args: str) -> None:
    if not Path(FFMPEG).exists():
        pytest.skip("ffmpeg not installed")
    subprocess.run([FFMPEG, "-v", "error", "-y", *args], check=True, timeout=60)


# --- fps schedule -----------------------------------------------------------------------------


def test_fps_schedule_range_determinism_and_low_fps_first():
    draws = lambda seed, step: [sample_fps(np.random.default_rng([seed, i]), step, 1000) for i in range(1500)]
    early, late = draws(0, 0), draws(0, 999)
    assert all(isinstance(f, int) and 1 <= f <= 30 for f in early + late)
    assert draws(0, 0) == early and draws(1, 0) != early
    assert np.mean(early) + 8 < np.mean(late)
    schedule = FpsSchedule()
    assert np.mean(early) == pytest.approx(schedule.mean_fps(0.0), abs=1.0)
    assert np.mean(late) == pytest.approx(schedule.mean_fps(1.0), abs=1.0)
    assert schedule.mean_fps(0.0) < schedule.mean_fps(0.5) < schedule.mean_fps(1.0)


def test_fps_schedule_can_run_the_other_way_and_rejects_bad_params():
    reverse = FpsSchedule(fps_min=2, fps_max=12, mean_start=0.8, mean_end=0.2)
    rng = np.random.default_rng(0)
    early = [reverse.sample(rng, 0.0) for _ in range(500)]
    late = [reverse.sample(rng, 1.0) for _ in range(500)]
    assert min(early + late) >= 2 and max(early + late) <= 12 and np.mean(early) > np.mean(late)
    for bad in ({"fps_min": 0}, {"fps_min": 10, "fps_max": 5}, {"mean_start": 1.0}, {"concentration": 0}):
        with pytest.raises(ValueError):
            FpsSchedule(**bad)


# --- indices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fps, stride", [(1, 30), (5, 6), (10, 3), (30, 1), (12, 3), (60, 1), (7, 4)])
def test_clip_indices_stride_from_native_fps(fps, stride):
    indices, fps_used = clip_indices(3678, 30.0, fps, 16, np.random.default_rng(fps))
    assert len(indices) == 16 and np.all(np.diff(indices) == stride)
    assert 0 <= indices[0] and indices[-1] < 3678
    assert fps_used == pytest.approx(30.0 / stride)


def test_clip_indices_random_start_and_short_video_fallback():
    starts = {clip_indices(1000, 30.0, 10, 16, np.random.default_rng(s))[0][0] for s in range(20)}
    assert len(starts) > 10 and max(starts) <= 1000 - 46
    # 48 frames at 24 fps cannot hold 16 frames at 1 fps (stride 24): stride 3 is the largest that fits.
    indices, fps_used = clip_indices(48, 24.0, 1, 16, np.random.default_rng(0))
    assert np.all(np.diff(indices) == 3) and indices[-1] <= 47 and fps_used == 8.0
    assert clip_indices(16, 24.0, 1, 16)[0] == list(range(16))
    with pytest.raises(ValueError, match="15 frames"):
        clip_indices(15, 24.0, 1, 16)


# --- decoding ---------------------------------------------------------------------------------


def test_real_video_native_rate_and_length():
    reader = decord.VideoReader(str(_real_video()))
    assert reader.get_avg_fps() == pytest.approx(30.0) and len(reader) == 3678


@pytest.mark.parametrize("fps", [1, 5, 10, 30])
def test_decode_real_video_at_several_fps(fps):
    path = _real_video()
    frames, fps_used, *_ = decode_clip(path, 16, fps, np.random.default_rng(fps), size=(18, 32))
    assert frames.shape == (16, 18, 32, 3) and frames.dtype == np.uint8
    assert fps_used == pytest.approx(fps)


def test_decode_uses_the_sampled_indices():
    path = _real_video()
    frames, *_ = decode_clip(path, 16, 5, np.random.default_rng(7), size=(18, 32))
    reader = decord.VideoReader(str(path), width=32, height=18)
    indices, _ = clip_indices(len(reader), reader.get_avg_fps(), 5, 16, np.random.default_rng(7))
    assert np.all(np.diff(indices) == 6)
    np.testing.assert_array_equal(frames, reader.get_batch(indices).asnumpy())


def test_decode_resizes_and_crops_at_decode_time():
    path = _real_video()
    square, *_ = decode_clip(str(path), 4, 30, np.random.default_rng(0), size=24, as_float=True)
    assert square.shape == (3, 4, 24, 24) and square.dtype == torch.float32  # (C, F, H, W)
    assert -1.0 <= square.min() < square.max() <= 1.0


def test_decode_to_narrow_widths_matches_area_downscale(short_videos):
    # decord cannot emit some narrow widths (16, 48, ...): decode_clip pools a larger decode instead.
    path = short_videos["pattern"]
    small, *_ = decode_clip(path, 4, 24, np.random.default_rng(0), size=(16, 16))
    reader = decord.VideoReader(str(path), width=64, height=64)
    indices, _ = clip_indices(len(reader), reader.get_avg_fps(), 24, 4, np.random.default_rng(0))
    full = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()
    expected = torch.nn.functional.avg_pool2d(full, 4).permute(0, 2, 3, 1).numpy()  # (F, H, W, C)
    assert small.shape == (4, 16, 16, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(np.float32) - expected).mean() < 8.0


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory) -> dict[str, Path]:
    """A 2 s 24 fps test pattern (48 frames) and the real video cut to its first 3 s (90 frames)."""
    root = tmp_path_factory.mktemp("videos")
    pattern = root / "pattern.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=24", "-t", "2", "-c:v", "libx264", "-g", "6",
            "-pix_fmt", "yuv420p", str(pattern))
    real = root / "real_3s.mp4"
    _ffmpeg("-i", str(_real_video()), "-t", "3", "-c", "copy", "-an", str(real))
    return {"pattern": pattern, "real": real}


def test_decode_from_bytes_falls_back_when_too_short(short_videos):
    frames, fps_used, *_ = decode_clip(short_videos["pattern"].read_bytes(), 16, 1, np.random.default_rng(0), size=32)
    assert frames.shape == (16, 32, 32, 3) and fps_used == 8.0


# --- shard readers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(short_videos, tmp_path_factory) -> Path:
    import webdataset as wds

    path = tmp_path_factory.mktemp("shards") / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "pattern", "mp4": short_videos["pattern"].read_bytes()})
        sink.write({"__key__": "real", "mp4": short_videos["real"].read_bytes()})
        sink.write({"__key__": "corrupt", "mp4": b"\x00\x00\x00\x18ftypmp42 not really a video"})
    return path


def test_clip_dataset_reads_shards_and_skips_broken_samples(shard):
    dataset = ClipDataset([str(shard)], n_frames=16, size=32, fps=1, shuffle_shards=False)
    clips = list(dataset)
    assert len(clips) == 2  # the corrupt sample is skipped
    (pattern, pattern_fps), (real, real_fps) = clips
    assert pattern.shape == real.shape == (3, 16, 32, 32)
    assert pattern_fps.item() == 8.0 and real_fps.item() == 5.0  # 48 frames at 24 fps, 90 frames at 30 fps
    assert pattern.min() >= -1.0 and pattern.max() <= 1.0
    frames, fps = next(iter(clip_batches(ClipDataset([str(shard)], n_frames=8, size=16, seed=3), batch_size=2)))
    assert frames.shape == (2, 3, 8, 16, 16) and fps.shape == (2,)  # (B, C, F, H, W)
    assert torch.all((fps >= 1) & (fps <= 30))


@pytest.mark.slow
def test_ray_clip_dataset_yields_the_same_clips(shard, ray_session):
    dataset = ray_clip_dataset([str(shard)], n_frames=16, size=32, fps=1)
    batches = list(iter_ray_clips(dataset, batch_size=2))  # the corrupt sample is dropped
    assert len(batches) == 1
    frames, fps = batches[0]
    assert frames.shape == (2, 3, 16, 32, 32) and frames.dtype == torch.float32  # (B, C, F, H, W)
    assert sorted(fps.tolist()) == [5.0, 8.0]
