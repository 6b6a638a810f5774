"""The cascade sampler as a plain function of its networks (no I/O), and the paper's four uses.

    video = SR_h(SR_l(F(Dt(P(text), fps))))

Each stage is one call of `model.samplers.sample` with the stage's own schedule, sampler settings and
classifier-free guidance scale; the stages only hand tensors to each other. The other uses swap the start:
- `animate_image`: the image's CLIP embedding is the condition and the image is held as frame 0 while F
  extrapolates the base clip (`frames.animation_mask`);
- `interpolate_images`: two images as first and last frames, F generates the frames between;
- `vary_video`: the mean CLIP embedding of a video's frames replaces the prior's output.
With `temporal.candidates` k > 1, Dt samples k base videos per row and keeps the one whose frames are closest
in CLIP space to the prompt (to the source video for a variation): DALL-E's re-ranking at the video level;
`temporal.jump_penalty` marks down a candidate whose largest step between frames dwarfs its typical one.
The base video of every use is stored under "temporal" (for animation and interpolation F makes it).

Outputs are keyed by stage name: "prior" holds the conditioning CLIP image embedding (B, D) (sampled by
the prior for text, computed from pixels otherwise); the others videos (B, C, F, H, W) in [-1, 1].
Every stage draws its noise from its own CPU generator seeded from (seed, stage), so a stage's result
does not depend on how many draws an earlier stage made, and CPU and GPU runs start from the same noise.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from model.clip import build_clip, encode_images, encode_text_tokens, tokenize
from model.config import CascadeConfig
from model.diffusion import around_base, make_schedule, noise_augment, null_condition, residual_base
from model.frames import (animation_mask, fill_by_windows, interpolation_channels, linear_fill, mask_from_indices,
                          place_at, plan_windows, spread_indices, two_image_mask)
from model.layers import fold_frames
from model.networks import build_network
from model.precision import Precision, autocast_context, default_precision
from model.samplers import sample
from model.unet import apply_per_frame

STAGE_ORDER = ("prior", "temporal", "interpolation", "sr_low", "sr_high")
# The networks each use runs, in order; "prior" of the image/video uses is CLIP alone.
USES: dict[str, tuple[str, ...]] = {
    "text": ("prior", "temporal", "interpolation", "sr_low", "sr_high"),
    "animate": ("interpolation", "sr_low", "sr_high"),
    "interpolate": ("interpolation", "sr_low", "sr_high"),
    "vary": ("temporal", "interpolation", "sr_low", "sr_high"),
}
# Which network makes each stage's output, per use (animation and interpolation start with F).
_MAKER = {"temporal": {"animate": "interpolation", "interpolate": "interpolation"}}


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def close(self) -> None: ...


Progress = bool | Callable[[str, int], ProgressBar]  # True: tqdm; a callable: (stage, total steps) -> bar


@dataclass
class Cascade:
    """The built networks of one cascade, with CLIP, its tokenizer and the config they follow.
    `sources` says where each stage's weights came from (filled by the loader; empty = random weights)."""

    cfg: CascadeConfig
    clip: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    nets: dict[str, nn.Module]
    device: torch.device
    precision: Precision
    sr_high_chunk: int = 8  # frames per SR_h forward: bounds memory at 768 px
    sources: dict[str, dict] = field(default_factory=dict)

    def net(self, stage: str) -> nn.Module:
        if stage not in self.nets:
            raise ValueError(f"this cascade has no {stage!r} network (built: {sorted(self.nets)})")
        return self.nets[stage]


@dataclass
class CascadeOutput:
    """Stage outputs (see module doc) with the seed, fps and seconds of each stage that ran."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    fps: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, stage: str) -> torch.Tensor:
        return self.outputs[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.outputs

    @property
    def last_stage(self) -> str:
        return [s for s in STAGE_ORDER if s in self.outputs][-1]


def stages_needed(use: str, stop_at: str | None = None, cfg: CascadeConfig | None = None) -> tuple[str, ...]:
    """Networks (besides CLIP) a use runs up to `stop_at`: what a loader must provide. Given the cascade's
    config, the image decoder D too where Dt runs with `temporal.keyframe` set (D draws the key frame)."""
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; choose one of {sorted(USES)}")
    last = _stop_index(stop_at)
    needed = {stage_network(use, s) for s in STAGE_ORDER[:last + 1]}
    if cfg is not None and cfg.temporal.keyframe != "none" and "temporal" in needed:
        needed.add("decoder")
    return tuple(s for s in ("decoder", *USES[use]) if s in needed)


def stage_network(use: str, stage: str) -> str:
    """The network that makes `stage`'s output in `use`: "clip" for the image/video uses' embedding,
    "interpolation" (F) for the base clip of animation and image interpolation, else the stage's own."""
    if stage == "prior" and use != "text":
        return "clip"
    return _MAKER.get(stage, {}).get(use, stage)


def _stop_index(stop_at: str | None) -> int:
    if stop_at is None:
        return len(STAGE_ORDER) - 1
    if stop_at not in STAGE_ORDER:
        raise ValueError(f"stop_at must be one of {list(STAGE_ORDER)}, got {stop_at!r}")
    return STAGE_ORDER.index(stop_at)


def build_cascade(cfg: CascadeConfig, state_dicts: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
                  *, stages: Sequence[str] | None = None, device: torch.device | str = "cpu",
                  precision: Precision | None = None, sr_high_chunk: int = 8) -> Cascade:
    """Build CLIP and the networks of `stages` (default: what text-to-video runs). A stage whose weights are
    missing or None keeps its random initialisation: for tests and benchmarks only;
    pipelines.generate.load_cascade requires every weight. CLIP loads `state_dicts["clip"]`, else
    `cfg.clip.weights_path`, else stays random."""
    state_dicts = dict(state_dicts or {})
    device = torch.device(device)
    clip, _, tokenizer = build_clip(cfg.clip, device=device)
    if state_dicts.get("clip") is not None:
        clip.load_state_dict(state_dicts["clip"])
    nets = {}
    for stage in stages if stages is not None else stages_needed("text", None, cfg):
        net = build_network(stage, cfg)
        if state_dicts.get(stage) is not None:
            net.load_state_dict(state_dicts[stage])
        nets[stage] = net.to(device).eval().requires_grad_(False)
    return Cascade(cfg, clip.requires_grad_(False).eval(), tokenizer, nets, device,
                   precision or default_precision(device), sr_high_chunk)


def stage_seed(seed: int, stage: str) -> int:
    """A stage's seed, derived from the run's seed and the stage name (stable across Python runs)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:8], "little") & (2**63 - 1)


# --- one sampler call per stage ----------------------------------------------------------------------

def _bar(progress: Progress, stage: str, total: int) -> ProgressBar | None:
    if progress is False:
        return None
    if progress is True:
        from tqdm.auto import tqdm  # only when asked, as in model.samplers

        return tqdm(total=total, desc=stage, leave=False)
    return progress(stage, total)


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


def _keep_best(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """candidates (B, K, ...), scores (B, K) -> each row's highest-scoring candidate (B, ...)."""
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), scores.argmax(dim=1)]


def text_embedding(cascade: Cascade, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (B, D) of the prompts."""
    with autocast_context(cascade.device, cascade.precision):
        tokens = tokenize(cascade.clip, cascade.tokenizer, prompts)  # (B, L)
        return cascade.clip.encode_text(tokens, normalize=True).float()


def frame_embeddings(cascade: Cascade, videos: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings of every frame: (B, C, F, H, W) -> (B, F, D)."""
    return image_embedding(cascade, fold_frames(videos)).view(videos.shape[0], videos.shape[2], -1)


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


def decode_images(cascade: Cascade, emb: torch.Tensor, generator: torch.Generator,
                  bar: ProgressBar | None = None) -> torch.Tensor:
    """The image decoder D: one base-size image per CLIP image embedding (B, D) -> (B, C, base, base), with
    D's own sampler settings."""
    s = cascade.cfg.shape
    return _sample_stage(cascade, "decoder", (emb.shape[0], s.channels, s.base_size, s.base_size),
                         {"cond_emb": emb}, generator, bar)


def keyframe_ranked(cascade: Cascade, images: torch.Tensor, target: torch.Tensor, keep: int) -> torch.Tensor:
    """images (P*n, C, H, W), n draws per prompt in order, target (P, D) -> the `keep` draws of each prompt
    whose CLIP image embeddings are closest to its target, best first: (P*keep, C, H, W)."""
    p = target.shape[0]
    scores = torch.einsum("pnd,pd->pn", image_embedding(cascade, images).view(p, -1, target.shape[1]), target)
    best = scores.topk(keep, dim=1).indices  # (P, keep)
    return images.view(p, -1, *images.shape[1:])[torch.arange(p, device=images.device)[:, None], best].flatten(0, 1)


def keyframe_index(keyframe: str, frames: int) -> int | None:
    """The frame `temporal.keyframe` has D draw: 0 ("first"), (frames - 1) // 2 ("middle") or None."""
    return {"none": None, "first": 0, "middle": (frames - 1) // 2}[keyframe]


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


# --- running a use: stop_at, seeds, timings ------------------------------------------------------------

class _Run:
    """Bookkeeping of one call: which stages run, each stage's generator, bar and wall time."""

    def __init__(self, cascade: Cascade, seed: int, stop_at: str | None, progress: Progress) -> None:
        self.cascade, self.seed, self.progress = cascade, seed, progress
        self.last = _stop_index(stop_at)
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


def image_embedding(cascade: Cascade, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (B, D) of images (B, C, H, W) in [-1, 1]."""
    with autocast_context(cascade.device, cascade.precision):
        emb = encode_images(cascade.clip, ((images.to(cascade.device) + 1) / 2).clamp(0, 1))
    return Fn.normalize(emb.float(), dim=-1)


def video_embedding(cascade: Cascade, video: torch.Tensor) -> torch.Tensor:
    """The mean CLIP image embedding of a video's frames, renormalised (as the video stages trained):
    (B, C, F, H, W) -> (B, D)."""
    return Fn.normalize(frame_embeddings(cascade, video).mean(dim=1), dim=-1)


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


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) in [-1, 1] -> (B, F, H, W, C) uint8 on CPU, the layout encoders take."""
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu()

