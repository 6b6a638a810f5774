"""One sampler call per cascade stage, on the networks of a `model.cascade.Cascade` (no I/O).

Each stage is one call of `model.samplers.sample` with the stage's own schedule, sampler settings and
classifier-free guidance scale; the stages only hand tensors to each other. With `temporal.candidates` k > 1,
Dt samples k base videos per row and keeps the one whose frames are closest in CLIP space to a target (the
prompt, or the source video of a variation): DALL-E's re-ranking at the video level; `temporal.jump_penalty`
marks down a candidate whose largest step between frames dwarfs its typical one. With `temporal.keyframe`
set, the image decoder D draws a key frame that Dt's sampler holds (`keyframe_hooks`).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from model.cascade import Cascade
from model.clip import encode_images, encode_text_tokens, tokenize
from model.diffusion import around_base, make_schedule, noise_augment, null_condition, residual_base
from model.frames import (fill_by_windows, interpolation_channels, linear_fill, mask_from_indices, place_at,
                          spread_indices)
from model.layers import fold_frames
from model.precision import autocast_context
from model.samplers import sample
from model.unet import apply_per_frame


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def close(self) -> None: ...


def _network_fn(cascade: Cascade, net: nn.Module, per_frame: bool = False) -> Callable[..., torch.Tensor]:
    """The network as the sampler's model: autocast in the cascade's precision, F's extra input channels
    passed as the `extra` kwarg (so guidance batches them like any condition), SR_h run frame by frame."""
    def call(x: torch.Tensor, t: torch.Tensor, extra: torch.Tensor | None = None, **kw) -> torch.Tensor:
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)  # (B, C + C + 1, F, H, W)
        with autocast_context(cascade.device, cascade.precision):
            out = apply_per_frame(net, x, cascade.sr_high_chunk, t=t, **kw) if per_frame else net(x, t, **kw)
        return out.float()

    return call


def _clamp(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x0.clamp(-1, 1)  # pixels live in [-1, 1]; clipping the estimate keeps guided steps in range


def _sample_stage(cascade: Cascade, stage: str, shape: Sequence[int], cond: dict, generator: torch.Generator,
                  bar: ProgressBar | None, net_name: str | None = None, per_frame: bool = False,
                  **hooks) -> torch.Tensor:
    """One stage: its schedule, sampler and guidance; the null condition is zeros on `cond_emb` or the
    prior's text inputs, every other kwarg is shared by both branches. Pixels are clipped to [-1, 1]
    unless the caller gives its own `denoised_fn` (a residual SR stage's estimate is a difference)."""
    stage_cfg = getattr(cascade.cfg, net_name or stage)
    keys = ("text_emb", "text_tokens") if stage == "prior" else ("cond_emb",)
    uncond = {**cond, **null_condition({k: cond[k] for k in keys})}
    callback = (lambda *_: bar.update(1)) if bar is not None else None
    model = _network_fn(cascade, cascade.net(net_name or stage), per_frame)
    pixels = stage != "prior" and "denoised_fn" not in hooks
    if pixels:
        hooks["denoised_fn"] = _clamp
    out = sample(model, make_schedule(stage_cfg.diffusion), stage_cfg.sampler, tuple(shape), cond,
                 prediction=stage_cfg.diffusion.prediction, generator=generator, uncond_kwargs=uncond,
                 callback=callback, device=cascade.device, dtype=torch.float32,
                 frame_share=stage_cfg.diffusion.frame_noise_share, **hooks)
    return out.clamp(-1, 1) if pixels else out


def _fps(value: float, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), float(value), device=device)  # (B,)


# --- CLIP embeddings and the ranking of candidates ------------------------------------------------

def text_embedding(cascade: Cascade, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (B, D) of the prompts."""
    with autocast_context(cascade.device, cascade.precision):
        tokens = tokenize(cascade.clip, cascade.tokenizer, prompts)  # (B, L)
        return cascade.clip.encode_text(tokens, normalize=True).float()


def image_embedding(cascade: Cascade, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (B, D) of images (B, C, H, W) in [-1, 1]."""
    with autocast_context(cascade.device, cascade.precision):
        emb = encode_images(cascade.clip, ((images.to(cascade.device) + 1) / 2).clamp(0, 1))
    return Fn.normalize(emb.float(), dim=-1)


def frame_embeddings(cascade: Cascade, videos: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings of every frame: (B, C, F, H, W) -> (B, F, D)."""
    return image_embedding(cascade, fold_frames(videos)).view(videos.shape[0], videos.shape[2], -1)


def video_embedding(cascade: Cascade, video: torch.Tensor) -> torch.Tensor:
    """The mean CLIP image embedding of a video's frames, renormalised (as the video stages trained):
    (B, C, F, H, W) -> (B, D)."""
    return Fn.normalize(frame_embeddings(cascade, video).mean(dim=1), dim=-1)


def frame_similarity(cascade: Cascade, videos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per video (B, C, F, H, W): the mean over its frames of the cosine between the frame's CLIP image
    embedding and target (B, D), unit norm - CLIPSIM when target is the prompt's text embedding. (B,)"""
    emb = frame_embeddings(cascade, videos)
    return torch.einsum("bfd,bd->b", emb, target.to(emb)) / emb.shape[1]


def frame_jumps(videos: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per video (B, C, F, H, W): log(largest / median mean-absolute change between consecutive frames), 0
    for fewer than 3 frames. An object moving evenly (or held) gives about 0; one that jumps between two
    places in one step gives that step's excess. (B,)"""
    if videos.shape[2] < 3:
        return videos.new_zeros(videos.shape[0])
    steps = (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(1, 3, 4)).float()  # (B, F-1)
    return torch.log((steps.amax(dim=1) + eps) / (steps.median(dim=1).values + eps))


def candidate_scores(cascade: Cascade, videos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What `temporal.candidates` ranks by: `frame_similarity` to the target less `temporal.jump_penalty`
    times `frame_jumps`. (B,)"""
    scores = frame_similarity(cascade, videos, target)
    weight = cascade.cfg.temporal.jump_penalty
    return scores - weight * frame_jumps(videos).to(scores) if weight else scores


def _keep_best(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """candidates (B, K, ...), scores (B, K) -> each row's highest-scoring candidate (B, ...)."""
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), scores.argmax(dim=1)]


# --- the stages ---------------------------------------------------------------------------------------

def sample_prior(cascade: Cascade, prompts: Sequence[str], generator: torch.Generator,
                 bar: ProgressBar | None = None) -> torch.Tensor:
    """Text -> CLIP image embedding (B, D), unit norm like the embeddings the decoders were trained on."""
    with autocast_context(cascade.device, cascade.precision):
        tokens = tokenize(cascade.clip, cascade.tokenizer, prompts)  # (B, L)
        text_emb = cascade.clip.encode_text(tokens, normalize=True).float()  # (B, D)
        text_tokens = encode_text_tokens(cascade.clip, tokens).float()  # (B, L, D)
    cond = {"text_emb": text_emb, "text_tokens": text_tokens, "text_mask": tokens != 0}
    # DALL-E 2's re-ranking: k candidates per prompt (rows i*k .. i*k+k-1), keep the closest to the text.
    k, b = cascade.cfg.prior.candidates, len(prompts)
    cond = {key: value.repeat_interleave(k, dim=0) for key, value in cond.items()}
    emb = _sample_stage(cascade, "prior", (b * k, cascade.cfg.prior.net.embed_dim), cond, generator, bar)
    emb = Fn.normalize(emb, dim=-1).view(b, k, -1)  # (B, K, D)
    return _keep_best(emb, torch.einsum("bkd,bd->bk", emb, text_emb))


def decode_images(cascade: Cascade, emb: torch.Tensor, generator: torch.Generator,
                  bar: ProgressBar | None = None) -> torch.Tensor:
    """The image decoder D: one base-size image per CLIP image embedding (B, D) -> (B, C, base, base), with
    D's own sampler settings."""
    s = cascade.cfg.shape
    return _sample_stage(cascade, "decoder", (emb.shape[0], s.channels, s.base_size, s.base_size),
                         {"cond_emb": emb}, generator, bar)


def keyframe_index(keyframe: str, frames: int) -> int | None:
    """The frame `temporal.keyframe` has D draw: 0 ("first"), (frames - 1) // 2 ("middle") or None."""
    return {"none": None, "first": 0, "middle": (frames - 1) // 2}[keyframe]


def keyframe_ranked(cascade: Cascade, images: torch.Tensor, target: torch.Tensor, keep: int) -> torch.Tensor:
    """images (P*n, C, H, W), n draws per prompt in order, target (P, D) -> the `keep` draws of each prompt
    whose CLIP image embeddings are closest to its target, best first: (P*keep, C, H, W)."""
    p = target.shape[0]
    scores = torch.einsum("pnd,pd->pn", image_embedding(cascade, images).view(p, -1, target.shape[1]), target)
    best = scores.topk(keep, dim=1).indices  # (P, keep)
    return images.view(p, -1, *images.shape[1:])[torch.arange(p, device=images.device)[:, None], best].flatten(0, 1)


def keyframe_hooks(cascade: Cascade, emb: torch.Tensor, shape: Sequence[int], generator: torch.Generator,
                   target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """With `temporal.keyframe` set: the image decoder D draws one frame per row of `emb` (B, D) and the
    sampler hooks (`x_known`, `mask`) that hold it at its index of Dt's video `shape` (B, C, F, H, W), with
    `temporal.keyframe_guidance` > 0 reconstruction guidance toward it (`known_guidance`; none in the last
    `temporal.keyframe_guidance_stop` share of the schedule), with
    `temporal.keyframe_strength` < 1 also the start from it repeated over the frames (SDEdit's `x_init`,
    `strength`); {} without. D samples with its own sampler settings, as it does for an image.

    Given a `target` (P, D), the rows are P prompts' k = B / P candidates (rows i*k .. i*k+k-1 share one
    embedding); with `temporal.keyframe_draws` m > 1 D draws m frames per row and each prompt's k candidates
    get the k of its k*m draws closest to its target (`keyframe_ranked`)."""
    index = keyframe_index(cascade.cfg.temporal.keyframe, shape[2])
    if index is None:
        return {}
    b, c, f, h, w = shape
    stage_cfg = cascade.cfg.temporal
    m = stage_cfg.keyframe_draws if target is not None else 1
    image = decode_images(cascade, emb.repeat_interleave(m, dim=0), generator)  # (B*m, C, H, W)
    if m > 1:
        image = keyframe_ranked(cascade, image, target, b // target.shape[0])
    video = image.new_zeros(shape)
    video[:, :, index] = image
    known = mask_from_indices([index], f).to(image.device)
    hooks = {"x_known": video, "mask": known[None, None, :, None, None], "known_guidance": stage_cfg.keyframe_guidance,
             "known_guidance_min_t": round(stage_cfg.keyframe_guidance_stop * stage_cfg.diffusion.timesteps)}
    strength = stage_cfg.keyframe_strength
    if strength < 1.0:
        hooks.update(x_init=image[:, :, None].expand(shape), strength=strength)
    return hooks


def sample_temporal(cascade: Cascade, emb: torch.Tensor, fps: float, generator: torch.Generator,
                    bar: ProgressBar | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """Dt: frames x base_size video (B, C, F, H, W) conditioned on the embedding and fps. Given a `target`
    (B, D) and `temporal.candidates` k > 1, k videos per row are sampled in one batch (rows i*k .. i*k+k-1)
    and the best by `candidate_scores` kept (closest to the target, with `temporal.jump_penalty` evenest)."""
    s, b = cascade.cfg.shape, emb.shape[0]
    k = cascade.cfg.temporal.candidates if target is not None else 1
    cond = {"cond_emb": emb.repeat_interleave(k, dim=0), "fps": _fps(fps, b * k, cascade.device)}
    shape = (b * k, s.channels, s.frames, s.base_size, s.base_size)
    hooks = keyframe_hooks(cascade, cond["cond_emb"], shape, generator, target)
    videos = _sample_stage(cascade, "temporal", shape, cond, generator, bar, **hooks)
    if k == 1:
        return videos
    scores = candidate_scores(cascade, videos, target.repeat_interleave(k, dim=0)).view(b, k)
    return _keep_best(videos.view(b, k, *videos.shape[1:]), scores)


def sample_masked(cascade: Cascade, video: torch.Tensor, known: torch.Tensor, emb: torch.Tensor, fps: float,
                  generator: torch.Generator, bar: ProgressBar | None = None) -> torch.Tensor:
    """F on one window: video (B, C, T, H, W) with known frames in place, known (T,) bool. The known
    frames enter as F's extra channels and are held exactly by the sampler's x_known/mask hook; with
    fill_strength < 1 the unknown ones start from their linear fill, noised (SDEdit)."""
    stage_cfg = cascade.cfg.interpolation
    extra = interpolation_channels(video, known, stage_cfg.known_fill)  # (B, C+1, T, H, W)
    cond = {"cond_emb": emb, "fps": _fps(fps, video.shape[0], video.device), "extra": extra}
    mask = known.to(video.device)[None, None, :, None, None]  # (1, 1, T, 1, 1)
    start = {}
    if stage_cfg.fill_strength < 1.0:
        start = {"x_init": linear_fill(video, known), "strength": stage_cfg.fill_strength}
    return _sample_stage(cascade, "interpolation", video.shape, cond, generator, bar, x_known=video, mask=mask,
                         **start)


def interpolate_frames(cascade: Cascade, video: torch.Tensor, target: int, emb: torch.Tensor, fps: float,
                       generator: torch.Generator, bar: ProgressBar | None = None) -> torch.Tensor:
    """F: (B, C, F, H, W) -> (B, C, target, H, W), the given frames spread evenly and kept exactly, the
    rest generated window by window (`plan_windows`: windows of the trained clip length, each starting on a
    known frame)."""
    known_idx = spread_indices(video.shape[2], target)
    placed, _ = place_at(video, known_idx, target)  # (B, C, T, H, W)
    known = mask_from_indices(known_idx, target)
    if bool(known.all()):
        return video
    return fill_by_windows(placed, known, cascade.cfg.shape.frames,
                           lambda v, m: sample_masked(cascade, v, m, emb, fps, generator, bar))


def _noised_lowres(cascade: Cascade, stage: str, lowres: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-conditioning augmentation at the sampler's level, with the stage's own schedule."""
    stage_cfg = getattr(cascade.cfg, stage)
    return noise_augment(lowres, stage_cfg.sampler.noise_aug_level, make_schedule(stage_cfg.diffusion), generator)


def _super_resolve(cascade: Cascade, stage: str, video: torch.Tensor, size: int, cond: dict,
                   generator: torch.Generator, bar: ProgressBar | None, per_frame: bool = False) -> torch.Tensor:
    """An SR stage on video (B, C, F, h, w) -> (B, C, F, size, size): the noise-augmented input as
    `lowres`; a residual stage samples the difference to the clean input's bilinear upsample."""
    low, t_aug = _noised_lowres(cascade, stage, video, generator)
    cond = {**cond, "lowres": low, "noise_level": t_aug}
    shape = (*video.shape[:3], size, size)
    base = residual_base(getattr(cascade.cfg, stage).diffusion, video, size)
    return around_base(lambda **hooks: _sample_stage(cascade, stage, shape, cond, generator, bar,
                                                     per_frame=per_frame, **hooks), base)


def super_resolve_low(cascade: Cascade, video: torch.Tensor, emb: torch.Tensor, fps: float,
                      generator: torch.Generator, bar: ProgressBar | None = None) -> torch.Tensor:
    """SR_l (pseudo-3D, all frames at once so they stay consistent): base -> sr_low_size."""
    cond = {"cond_emb": emb, "fps": _fps(fps, video.shape[0], video.device)}
    return _super_resolve(cascade, "sr_low", video, cascade.cfg.shape.sr_low_size, cond, generator, bar)


def super_resolve_high(cascade: Cascade, video: torch.Tensor, emb: torch.Tensor,
                       generator: torch.Generator, bar: ProgressBar | None = None) -> torch.Tensor:
    """SR_h (a 2D net, per frame, `sr_high_chunk` frames per forward): sr_low_size -> sr_high_size."""
    return _super_resolve(cascade, "sr_high", video, cascade.cfg.shape.sr_high_size, {"cond_emb": emb},
                          generator, bar, per_frame=True)
