"""The data each stage reads beyond its own folder, as the paper routes it.

Every stage reads its folder (`training.stages.StageSpec.data`) at its resolution. Two stages read a second
source when their config asks (the paper preset does):

- sr_low, `image_steps`: the first steps train on images of the image folder at sr_low_size, the temporal
  layers skipped (`enable_time=False`) so they keep their identity start; the clips follow (SR_l is trained
  on images, then on video).
- sr_high, `frame_share`: that share of every batch is single frames of clips of the video folder, the rest
  images (SR_h is trained on images and video frames). Clips are stored at sr_low_size, below SR_h's
  output, so with `crop_size` the stage trains on random crops of that side from both (the network is
  convolutional, and samples at full size).

A batch of images is {"image", "image_emb", "seed"} whichever source its samples came from; the losses
tell image batches from clip batches by their keys.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from model.config import CascadeConfig
from training.config import StageTrainConfig
from training.data import ImageDecoder, VideoDecoder, has_video_embeddings, stage_batches
from training.loaders.clips import FpsSchedule
from training.stages import ImageView, VideoView, stage_spec
from training.storage import read_manifest

# A second stream of samples draws its per-sample seeds from another run seed, so that an image and a
# frame at the same stream position do not share their noise.
SECOND_STREAM_SEED = 7919


def second_kind(stage: str, train: StageTrainConfig) -> str | None:
    """The folder kind ("images" / "videos") a stage reads besides its own, or None; checks the fields."""
    for field, owner in (("image_steps", "sr_low"), ("frame_share", "sr_high"), ("crop_size", "sr_high")):
        if getattr(train, field) and stage != owner:
            raise ValueError(f"train.{stage}.{field}: only the {owner} stage takes it")
    if train.image_steps >= train.steps > 0 and train.image_steps:
        raise ValueError(f"train.{stage}.image_steps={train.image_steps} leaves none of the {train.steps} steps "
                         "for the clips")
    if train.frame_share and train.crop_size is None:
        raise ValueError(f"train.{stage}.frame_share: frames of clips are stored below sr_high_size; set "
                         f"train.{stage}.crop_size to train on crops of both")
    if stage == "sr_low" and train.image_steps:
        return "images"
    if stage == "sr_high" and train.frame_share:
        return "videos"
    return None


def frames_per_batch(train: StageTrainConfig, world: int) -> int:
    """Frames of clips in each global batch of sr_high: frame_share of it, whole per worker."""
    frames = round(train.batch_size * train.frame_share)
    if frames % world or (train.batch_size - frames) % world:
        raise ValueError(f"frame_share {train.frame_share} of batch_size {train.batch_size} does not split into "
                         f"frames and images over {world} workers")
    return frames


def check_crop(stage: str, cascade: CascadeConfig, train: StageTrainConfig) -> None:
    """A crop that the low-res side divides into a whole size and the network's levels divide."""
    if train.crop_size is None:
        return
    shape, net = cascade.shape, cascade.sr_high.net
    factor = 2 ** (len(net.channel_mult) - 1)
    low = train.crop_size * shape.sr_low_size / shape.sr_high_size
    if train.crop_size > shape.sr_high_size or not low.is_integer() or train.crop_size % factor:
        raise ValueError(f"train.{stage}.crop_size={train.crop_size}: must be at most sr_high_size "
                         f"{shape.sr_high_size}, a multiple of {factor} and give a whole low-res side "
                         f"(x {shape.sr_low_size}/{shape.sr_high_size})")


def second_data(stage: str, cascade: CascadeConfig, train: StageTrainConfig, folders: dict[str, str | None]
                ) -> str | None:
    """The second folder the stage reads (of `folders`, by kind), checked: its kind, its CLIP embeddings,
    clips big enough for the crop; None when the stage reads only its own."""
    kind = second_kind(stage, train)
    check_crop(stage, cascade, train)
    if kind is None:
        return None
    root = folders.get(kind)
    if root is None:
        field = "image_steps" if kind == "images" else "frame_share"
        raise ValueError(f"train.{stage}.{field}: stage {stage} also reads {kind}; pass the {kind} dataset "
                         f"folder (--{kind})")
    manifest = read_manifest(root, kind)
    if kind == "videos":
        if not has_video_embeddings(root):
            raise ValueError(f"train.{stage}.frame_share: {root} has no stored frame embeddings; run the embed "
                             "flow on the video dataset first")
        stored = (manifest.get("settings") or {}).get("videos", {}).get("clip_size")
        if stored is not None and train.crop_size is not None and stored < train.crop_size:
            raise ValueError(f"train.{stage}.crop_size={train.crop_size}: the clips of {root} are stored at "
                             f"{stored} px")
    return root


class Cropped:
    """A decoder whose "image" is a random square crop of `size`, drawn from the sample's own rng."""

    def __init__(self, decode: Callable, size: int) -> None:
        self.decode, self.size = decode, size

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, progress: float) -> dict | None:
        out = self.decode(sample, rng, progress)
        if out is None:
            return None
        image = out["image"]
        top = int(rng.integers(0, image.shape[-2] - self.size + 1))
        left = int(rng.integers(0, image.shape[-1] - self.size + 1))
        return {**out, "image": image[..., top:top + self.size, left:left + self.size]}


class AsFrame:
    """A one-frame clip as an image sample: its frame, and its stored CLIP embedding as "image_emb"."""

    def __init__(self, decode: VideoDecoder) -> None:
        self.decode = decode

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, progress: float) -> dict | None:
        out = self.decode(sample, rng, progress)
        if out is None:
            return None
        return {"image": out["video"][:, 0], "image_emb": out["clip_emb"]}


def _frame_decoder(root: str, train: StageTrainConfig, crop: int) -> Callable:
    stored = (read_manifest(root, "videos").get("settings") or {}).get("videos", {}).get("clip_size", crop)
    schedule = FpsSchedule(train.fps_min, train.fps_max, *train.fps_mean)
    return Cropped(AsFrame(VideoDecoder(root, VideoView(stored, 1), schedule, train.video_datasets)), crop)


def _merged(first: Iterator[dict], second: Iterator[dict]) -> Iterator[dict[str, torch.Tensor]]:
    """The two streams' batches as one, with what both hold (a frame has no caption embedding)."""
    for a, b in zip(first, second):
        yield {k: torch.cat([a[k], b[k]]) for k in a if k in b}


def job_batches(stage: str, cascade: CascadeConfig, train: StageTrainConfig, data: str, extra: str | None, *,
                rank: int, world: int, start_step: int, split: str, **loader: Any) -> Iterator[dict]:
    """This worker's batches from `start_step` on, from the stage's folder and, where routed, its second
    one (see the module docstring). `loader`: stage_batches' other options (tokenizer, fps, ...)."""
    view = stage_spec(stage).view(cascade)
    common = dict(rank=rank, world=world, split=split, shuffle_buffer=train.shuffle_buffer, **loader)
    kind = second_kind(stage, train)
    if kind == "images":  # sr_low: images at sr_low_size first, then the clips from their own start
        steps = train.image_steps
        if start_step < steps:
            images = ImageView(cascade.shape.sr_low_size, True, False)
            batches = stage_batches(extra, images, global_batch=train.batch_size, seed=train.seed + SECOND_STREAM_SEED,
                                    total_steps=steps, start_step=start_step, **common)
            yield from (batch for _, batch in zip(range(steps - start_step), batches))
        yield from stage_batches(data, view, global_batch=train.batch_size, seed=train.seed,
                                 total_steps=train.steps - steps, start_step=max(0, start_step - steps), **common)
        return
    kw = dict(total_steps=train.steps, start_step=start_step, **common)
    if train.crop_size is not None:
        common_decode = Cropped(ImageDecoder(data, view), train.crop_size)
    else:
        common_decode = None
    if kind is None:
        yield from stage_batches(data, view, global_batch=train.batch_size, seed=train.seed, decode=common_decode,
                                 **kw)
        return
    frames = frames_per_batch(train, world)
    images = stage_batches(data, view, global_batch=train.batch_size - frames, seed=train.seed,
                           decode=common_decode, **kw)
    clips = stage_batches(extra, VideoView(train.crop_size, 1), global_batch=frames,
                          seed=train.seed + SECOND_STREAM_SEED, decode=_frame_decoder(extra, train, train.crop_size),
                          **kw)
    yield from _merged(images, clips)
