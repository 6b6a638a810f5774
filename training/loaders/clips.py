"""Training clips for the video stages: 16 frames at a random fps, decoded with decord.

The temporal decoder Dt is conditioned on the frame rate, so every clip carries the fps it was
actually sampled at. The fps is drawn from a Beta distribution whose mean moves across training
(`FpsSchedule`); the frames are picked with a stride of native_fps / fps (`clip_indices`) and
decoded, resized at decode time, by `decode_clip`. Shards are webdataset tars whose samples hold
an `.mp4` and nothing else the loader reads (no text: the video side never sees captions).

Two readers yield the same `(frames (C, F, H, W) float in [-1, 1], fps)` pairs:
`ClipDataset` (a torch IterableDataset over webdataset) and `ray_clip_dataset` (Ray Data).
"""
from __future__ import annotations

import io
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import decord
import numpy as np
import torch
import webdataset as wds

log = logging.getLogger(__name__)
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
Size = int | tuple[int, int] | None


@dataclass(frozen=True)
class FpsSchedule:
    """fps ~ fps_min + Beta(a, b) * (fps_max - fps_min), rounded to an integer fps.

    Parameterised by the Beta's mean m and concentration k (a = m k, b = (1 - m) k), because
    those are what one wants to move: m goes linearly from `mean_start` to `mean_end` as training
    progresses from 0 to 1, while k (the spread; larger is narrower) stays fixed. The defaults put
    the mean fps near 8 at the start and near 23 at the end (low fps = long strides = large motion
    first, as this project's design asks). The direction is only a setting: swap mean_start and
    mean_end to start at high fps and move to low fps instead.
    """

    fps_min: int = 1
    fps_max: int = 30
    mean_start: float = 0.25
    mean_end: float = 0.75
    concentration: float = 8.0

    def __post_init__(self) -> None:
        if not 1 <= self.fps_min <= self.fps_max:
            raise ValueError(f"need 1 <= fps_min <= fps_max, got {self.fps_min}, {self.fps_max}")
        for name in ("mean_start", "mean_end"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")

    def beta_params(self, progress: float) -> tuple[float, float]:
        """(a, b) of the unit Beta at `progress` in [0, 1] (clamped)."""
        p = min(max(progress, 0.0), 1.0)
        mean = self.mean_start + (self.mean_end - self.mean_start) * p
        return mean * self.concentration, (1.0 - mean) * self.concentration

    def mean_fps(self, progress: float) -> float:
        """Expected fps before rounding: fps_min + m (fps_max - fps_min)."""
        a, b = self.beta_params(progress)
        return self.fps_min + a / (a + b) * (self.fps_max - self.fps_min)

    def sample(self, rng: np.random.Generator, progress: float) -> int:
        a, b = self.beta_params(progress)
        x = rng.beta(a, b)
        return int(round(self.fps_min + x * (self.fps_max - self.fps_min)))


def sample_fps(rng: np.random.Generator, step: int, total_steps: int, fps_min: int = 1, fps_max: int = 30,
               mean_start: float = 0.25, mean_end: float = 0.75, concentration: float = 8.0) -> int:
    """One integer fps in [fps_min, fps_max] for training step `step` of `total_steps`."""
    schedule = FpsSchedule(fps_min, fps_max, mean_start, mean_end, concentration)
    return schedule.sample(rng, step / max(total_steps - 1, 1))


def stride_for(native_fps: float, fps: float) -> int:
    """The frame stride an fps maps to on a video at native_fps (round half up)."""
    return max(1, math.floor(native_fps / fps + 0.5))


def clip_indices(n_frames_video: int, native_fps: float, target_fps: float, n_frames: int = 16,
                 rng: np.random.Generator | None = None) -> tuple[list[int], float]:
    """Indices of `n_frames` frames at `target_fps`, and the fps they really have.

    stride = native_fps / target_fps rounded half up, at least 1 (asking above the native rate gives the
    native rate); the start is uniform over the positions where the clip fits (the first one
    when rng is None). A video too short for that stride gets the largest stride that fits, i.e.
    the lowest fps >= target that fits; the returned fps_used = native_fps / stride is the one the
    model must be conditioned on. Raises ValueError if even consecutive frames do not fit.
    """
    if n_frames < 1 or target_fps <= 0 or native_fps <= 0:
        raise ValueError(f"need n_frames >= 1 and fps > 0, got {n_frames}, {native_fps}, {target_fps}")
    if n_frames_video < n_frames:
        raise ValueError(f"video has {n_frames_video} frames, a clip needs {n_frames}")
    stride = stride_for(native_fps, target_fps)
    if n_frames > 1:
        stride = min(stride, (n_frames_video - 1) // (n_frames - 1))
    span = (n_frames - 1) * stride + 1
    start = 0 if rng is None else int(rng.integers(0, n_frames_video - span + 1))
    return [start + i * stride for i in range(n_frames)], native_fps / stride


def _source(path_or_bytes: str | Path | bytes) -> Any:
    return io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)


def _decode_dims(path_or_bytes: str | Path | bytes, size: Size) -> tuple[int, int, tuple[int, int] | None]:
    """(width, height) to ask decord for, and the centre crop (h, w) to take afterwards.

    A tuple (h, w) is an exact resize; an int resizes the short side to it, keeping the aspect
    ratio, then crops the centre square (what the square U-Nets want, without distortion).
    """
    if size is None:
        return -1, -1, None
    if isinstance(size, tuple):
        return size[1], size[0], None
    probe = decord.VideoReader(_source(path_or_bytes), num_threads=1)
    height, width = probe[0].shape[:2]
    del probe
    scale = size / min(height, width)
    # Even sizes: the scaler's chroma subsampling prefers them, and the crop stays centred.
    new_w, new_h = max(size, 2 * round(width * scale / 2)), max(size, 2 * round(height * scale / 2))
    return new_w, new_h, (size, size)


class Clip(NamedTuple):
    """A decoded clip, the fps it was sampled at, and the time span (seconds) its frames cover."""

    frames: np.ndarray | torch.Tensor
    fps: float
    start_s: float
    end_s: float


def decode_clip(path_or_bytes: str | Path | bytes, n_frames: int, target_fps: float, rng: np.random.Generator,
                size: Size = None, as_float: bool = False) -> Clip:
    """Decode one clip; returns (frames, fps_used, start_s, end_s).

    frames: uint8 numpy (F, H, W, C) by default, or with `as_float` a float32 tensor
    (C, F, H, W) in [-1, 1], the layout the video U-Nets take. Resizing happens inside the
    decoder (decord's width/height), so full-resolution frames never reach Python.
    """
    width, height, crop = _decode_dims(path_or_bytes, size)
    reader = decord.VideoReader(_source(path_or_bytes), width=width, height=height, num_threads=1)
    native = reader.get_avg_fps()
    indices, fps_used = clip_indices(len(reader), native, target_fps, n_frames, rng)
    try:
        frames = reader.get_batch(indices).asnumpy()  # (F, H, W, C) uint8
    except decord.DECORDError as err:
        if "size must exactly match" not in str(err) or width <= 0:
            raise
        frames = _decode_scaled_down(path_or_bytes, indices, width, height)
    if crop is not None:
        top, left = (frames.shape[1] - crop[0]) // 2, (frames.shape[2] - crop[1]) // 2
        frames = np.ascontiguousarray(frames[:, top:top + crop[0], left:left + crop[1]])
    return Clip(to_model_tensor(frames) if as_float else frames, fps_used, indices[0] / native, indices[-1] / native)


def decode_frames_every(path_or_bytes: str | Path | bytes, every_s: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame every `every_s` seconds of a whole video, short side resized to `size` and centre-cropped
    (as the training clips are): (uint8 (N, size, size, C), times in seconds (N,))."""
    width, height, crop = _decode_dims(path_or_bytes, size)
    reader = decord.VideoReader(_source(path_or_bytes), width=width, height=height, num_threads=1)
    native = reader.get_avg_fps()
    indices = list(range(0, len(reader), max(1, round(every_s * native))))
    try:
        frames = reader.get_batch(indices).asnumpy()  # (N, H, W, C) uint8
    except decord.DECORDError as err:
        if "size must exactly match" not in str(err):
            raise
        frames = _decode_scaled_down(path_or_bytes, indices, width, height)
    top, left = (frames.shape[1] - crop[0]) // 2, (frames.shape[2] - crop[1]) // 2
    frames = np.ascontiguousarray(frames[:, top:top + crop[0], left:left + crop[1]])
    return frames, np.asarray(indices, np.float32) / native


# decord 0.6 fails to copy out frames scaled to some narrow widths (2..24, 48 and 72 seen);
# wider frames always worked, so those clips are decoded at an integer multiple of the size and
# average-pooled down, which is exact area resampling.
_SAFE_DECODE_WIDTH = 74


def _decode_scaled_down(path_or_bytes: str | Path | bytes, indices: list[int], width: int, height: int) -> np.ndarray:
    factor = -(-_SAFE_DECODE_WIDTH // width)
    reader = decord.VideoReader(_source(path_or_bytes), width=width * factor, height=height * factor)
    big = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()  # (F, C, kH, kW)
    small = torch.nn.functional.avg_pool2d(big, factor).round().clamp(0, 255).to(torch.uint8)  # (F, C, H, W)
    return small.permute(0, 2, 3, 1).contiguous().numpy()  # (F, H, W, C)


def to_model_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, C) -> float32 (C, F, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (C, F, H, W)
    return x.float().div(127.5).sub(1.0)


def _video_bytes(sample: dict[str, Any]) -> bytes | None:
    for ext in VIDEO_EXTENSIONS:
        if isinstance(sample.get(ext), (bytes, bytearray)):
            return bytes(sample[ext])
    return None


class ClipDataset(torch.utils.data.IterableDataset):
    """Clips from webdataset shards: yields (frames (C, F, H, W) float in [-1, 1], fps float32 scalar).

    The fps schedule needs to know how far training is; an IterableDataset lives in worker
    processes and never sees the step, so each worker measures progress by the clips it has
    yielded: progress = yielded * num_workers / total_clips (pass total_clips = steps * batch).
    `fps` fixes the frame rate instead. Samples that cannot be decoded, or are shorter than
    `n_frames`, are skipped with a warning: a broken file must not stop a training run, and the
    flow has already recorded its outcome.
    """

    def __init__(self, urls: str | Sequence[str], n_frames: int = 16, size: Size = 64,
                 schedule: FpsSchedule = FpsSchedule(), total_clips: int = 10_000, fps: float | None = None,
                 seed: int = 0, shuffle_shards: bool = True, start_progress: float = 0.0) -> None:
        super().__init__()
        self.urls = urls if isinstance(urls, str) else [str(u) for u in urls]
        self.n_frames, self.size, self.schedule, self.fps = n_frames, size, schedule, fps
        self.total_clips, self.seed, self.shuffle_shards = max(total_clips, 1), seed, shuffle_shards
        self.start_progress = start_progress

    def _shards(self) -> wds.WebDataset:
        return wds.WebDataset(self.urls, shardshuffle=100 if self.shuffle_shards else False, seed=self.seed,
                              nodesplitter=wds.split_by_node, empty_check=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, worker])
        yielded = 0
        for sample in self._shards():
            progress = self.start_progress + yielded * n_workers / self.total_clips
            clip = decode_sample(sample, self.n_frames, self.size, rng, self.fps, self.schedule, progress)
            if clip is not None:
                yielded += 1
                yield clip.frames, clip.fps


def decode_sample(sample: dict[str, Any], n_frames: int, size: Size, rng: np.random.Generator,
                  fps: float | None, schedule: FpsSchedule, progress: float
                  ) -> Clip | None:
    """One webdataset sample -> Clip(frames (C, F, H, W), fps tensor, start_s, end_s) or None (logged) when
    it cannot be used."""
    key = sample.get("__key__", "?")
    data = _video_bytes(sample)
    if data is None:
        log.warning("sample %s has no video (%s); skipped", key, ", ".join(sorted(sample)))
        return None
    target = fps if fps is not None else schedule.sample(rng, progress)
    try:
        clip = decode_clip(data, n_frames, target, rng, size=size, as_float=True)
    except (decord.DECORDError, RuntimeError, ValueError) as err:
        log.warning("sample %s skipped: %s", key, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    return clip._replace(fps=torch.tensor(clip.fps, dtype=torch.float32))


def collate_clips(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(C, F, H, W), ()] * B -> ((B, C, F, H, W), (B,))."""
    frames, fps = zip(*batch)
    return torch.stack(frames), torch.stack(fps)


def clip_batches(dataset: ClipDataset, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of (frames (B, C, F, H, W), fps (B,)); the last partial batch is dropped so shapes stay fixed."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_clips, drop_last=True,
                                       persistent_workers=num_workers > 0)


class _RayDecode:
    """Picklable row mapper for Ray Data: one webdataset row -> {"frames", "fps"} (or none)."""

    def __init__(self, n_frames: int, size: Size, schedule: FpsSchedule, progress: float,
                 fps: float | None, seed: int) -> None:
        self.n_frames, self.size, self.schedule = n_frames, size, schedule
        self.progress, self.fps, self.seed = progress, fps, seed

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        # Seeded by the sample key, so a row decodes the same clip however Ray schedules it.
        rng = np.random.default_rng([self.seed, zlib.crc32(str(row.get("__key__", "")).encode())])
        clip = decode_sample(row, self.n_frames, self.size, rng, self.fps, self.schedule, self.progress)
        if clip is None:
            return []
        return [{"frames": clip.frames.numpy(), "fps": np.float32(clip.fps.item())}]


def ray_clip_dataset(shard_paths: str | Sequence[str], n_frames: int = 16, size: Size = 64,
                     schedule: FpsSchedule = FpsSchedule(), progress: float = 0.0, fps: float | None = None,
                     seed: int = 0) -> Any:
    """A Ray Data dataset of {"frames": float32 (C, F, H, W) in [-1, 1], "fps": float32} rows.

    Ray Data has no notion of the training step either: the trainer passes `progress` (0..1) and
    builds the dataset again when it wants the fps distribution to move (e.g. each epoch).
    """
    import ray.data  # optional backend: imported only when a Ray dataset is asked for

    paths = [shard_paths] if isinstance(shard_paths, str) else [str(p) for p in shard_paths]
    rows = ray.data.read_webdataset(paths, decoder=None)
    return rows.flat_map(_RayDecode(n_frames, size, schedule, progress, fps, seed))


def iter_ray_clips(dataset: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a Ray clip dataset as the same tensors `clip_batches` gives."""
    for batch in dataset.iter_torch_batches(batch_size=batch_size, drop_last=True):
        yield batch["frames"], batch["fps"]  # (B, C, F, H, W), (B,)

