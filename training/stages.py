"""One spec per stage of the cascade: how its network starts, which data it reads, and its loss.

clip, prior, decoder, sr_low and sr_high start fresh; temporal starts from the decoder's registered
weights inflated to the video model (temporal layers at the identity), interpolation from temporal's
with 4 zero-initialised input channels. Every diffusion loss goes through `model.diffusion.training_loss`
with classifier-free dropout of the condition at the stage's `cond_drop_prob`.

Random draws (timesteps, noise, dropout, masks, augmentation levels) are made per sample from the
sample's own seed (`SampleRng`), so a sample gets the same draws on whichever Ray worker holds it:
N workers then compute exactly what one worker computes on the same global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as Fn
from torch import nn

from model.config import CascadeConfig, SamplerConfig, UNetConfig
from model.diffusion import (Schedule, around_base, drop_condition, make_schedule, noise_augment, random_aug_levels,
                             randn_like, residual_base, sample_timesteps, training_loss)
from model.frames import interpolation_channels, sample_train_mask
from model.inflate import inflate_state_dict
from model.layers import fold_frames, resize
from model.networks import build_network
from model.samplers import sample

Batch = Mapping[str, torch.Tensor]
PREVIEW_STEPS = 4  # sampler steps of the periodic previews: enough to see a shape, cheap enough to run often


@dataclass(frozen=True)
class ImageView:
    """What an image stage reads per sample: pixels at `size` (None: none), the CLIP embeddings of
    embeddings/*.parquet, the caption's tokens."""

    size: int | None
    embeddings: bool
    tokens: bool


@dataclass(frozen=True)
class VideoView:
    """What a video stage reads per sample: `frames` frames at `size`, at a random fps (FpsSchedule)."""

    size: int
    frames: int


class SampleRng:
    """Per-sample random draws through the model's own functions, one torch.Generator per sample seeded
    from the sample's seed (batch["seed"], (B,) int64), so the draws do not depend on the batch split.
    The generators live on the device of the tensors they draw for (created there on first use), so noise
    is drawn where it is used; on one device every draw of a sample comes from one generator."""

    def __init__(self, seeds: torch.Tensor) -> None:
        self.seeds = [int(s) for s in seeds.tolist()]
        self._gens: dict[torch.device, list[torch.Generator]] = {}

    def on(self, device: torch.device | str) -> list[torch.Generator]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._gens:
            self._gens[device] = [torch.Generator(device).manual_seed(s) for s in self.seeds]
        return self._gens[device]

    def timesteps(self, schedule: Schedule, device: torch.device) -> torch.Tensor:
        return torch.cat([sample_timesteps(schedule, 1, device, g) for g in self.on(device)])  # (B,)

    def noise_like(self, x: torch.Tensor, frame_share: float = 0.0) -> torch.Tensor:
        return torch.cat([randn_like(x[i:i + 1], g, frame_share) for i, g in enumerate(self.on(x.device))])

    def drop(self, cond: torch.Tensor | Mapping[str, torch.Tensor], p: float):
        """Classifier-free dropout (`diffusion.drop_condition`), one draw per sample."""
        device = next(iter(cond.values())).device if isinstance(cond, Mapping) else cond.device
        rows = [drop_condition(_row(cond, i), p, g) for i, g in enumerate(self.on(device))]
        if isinstance(cond, Mapping):
            return {k: torch.cat([r[k] for r in rows]) for k in cond}
        return torch.cat(rows)

    def augment(self, lowres: torch.Tensor, max_level: float, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """SR noise-conditioning augmentation at a uniform level in [0, max_level] per sample."""
        outs = [noise_augment(lowres[i:i + 1], random_aug_levels(1, max_level, lowres.device, g), schedule, g)
                for i, g in enumerate(self.on(lowres.device))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def masks(self, frames: int, max_skip: int) -> list[torch.Tensor]:
        return [sample_train_mask(frames, max_skip, g) for g in self.on("cpu")]  # drawn as Python ints


def _clip_api():
    """model.clip, imported on first use: it imports open_clip (seconds per Ray worker), which the
    stages without CLIP (decoder, sr_high) never need."""
    import model.clip

    return model.clip


def _row(cond: torch.Tensor | Mapping[str, torch.Tensor], i: int):
    return {k: v[i:i + 1] for k, v in cond.items()} if isinstance(cond, Mapping) else cond[i:i + 1]


class ClipModule(nn.Module):
    """CLIP with the contrastive loss as its forward, so DDP sees one forward call per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return _clip_api().clip_loss(self.model, images, tokens)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (the diffusion data range) -> [0, 1] (what CLIP's preprocessing takes)."""
    return ((x + 1) / 2).clamp(0, 1)


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of images (B, C, H, W) or videos (B, C, F, H, W) to size x size, frame by frame:
    the low-res input an SR stage is trained from."""
    return resize(x, size, antialias=True)


class Stage:
    """A stage ready to train: its spec, the cascade config, its schedule and the frozen CLIP (if used)."""

    def __init__(self, spec: "StageSpec", cascade: CascadeConfig, clip: nn.Module | None = None) -> None:
        self.spec, self.cascade, self.clip = spec, cascade, clip
        self.cfg = getattr(cascade, spec.name)
        self.schedule = make_schedule(self.cfg.diffusion) if spec.name != "clip" else None

    @property
    def name(self) -> str:
        return self.spec.name

    def loss(self, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
        return self.spec.loss(self, net, batch, rng)

    def diffusion_loss(self, net: Callable, x0: torch.Tensor, rng: SampleRng, **model_kwargs: Any) -> torch.Tensor:
        return training_loss(net, self.schedule, x0, t=rng.timesteps(self.schedule, x0.device),
                             model_kwargs=model_kwargs, prediction=self.cfg.diffusion.prediction,
                             noise=rng.noise_like(x0, self.cfg.diffusion.frame_noise_share))

    def video_embedding(self, video: torch.Tensor, stored: torch.Tensor | None = None) -> torch.Tensor:
        """The mean CLIP image embedding of a clip's frames, renormalised: (B, C, F, H, W) -> (B, D). The
        loader's `stored` one (batch["clip_emb"], from the embed step's frame embeddings) when the dataset
        has them, else the frozen CLIP on the clip's frames."""
        if stored is not None:
            return stored[:video.shape[0]].to(video.device, torch.float32)
        if self.clip is None:
            raise RuntimeError(f"stage {self.name} needs the frozen CLIP")
        with torch.no_grad():
            emb = _clip_api().encode_images(self.clip, to_unit(fold_frames(video)).float())  # (B*F, D)
            return Fn.normalize(emb.reshape(video.shape[0], video.shape[2], -1).mean(1), dim=-1)

    def preview_sampler(self) -> SamplerConfig:
        return self.cfg.sampler.model_copy(update={"steps": min(self.cfg.sampler.steps, PREVIEW_STEPS),
                                                   "guidance_scale": 1.0})

    def draw(self, net: Callable, shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
             model_kwargs: Mapping | None = None, **hooks: Any) -> torch.Tensor:
        """A preview sample: the stage's sampler at PREVIEW_STEPS steps, no guidance."""
        return sample(net, self.schedule, self.preview_sampler(), shape, model_kwargs,
                      prediction=self.cfg.diffusion.prediction, generator=generator, device=device,
                      frame_share=self.cfg.diffusion.frame_noise_share, **hooks)


# --- losses ------------------------------------------------------------------------------------------

def clip_stage_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """open_clip's contrastive loss on (image, caption tokens); nothing random, no condition to drop."""
    return net(to_unit(batch["image"]), batch["tokens"])


def prior_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """image_emb from text_emb + the frozen CLIP's per-token text features; both dropped together."""
    with torch.no_grad():
        tokens = _clip_api().encode_text_tokens(stage.clip, batch["tokens"]).float()  # (B, L, D)
    cond = rng.drop({"text_emb": batch["text_emb"], "text_tokens": tokens}, stage.cfg.diffusion.cond_drop_prob)
    return stage.diffusion_loss(net, batch["image_emb"], rng, text_mask=batch["tokens"] != 0, **cond)


def decoder_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """64px (base_size) images conditioned on their own CLIP image embedding."""
    cond = rng.drop(batch["image_emb"], stage.cfg.diffusion.cond_drop_prob)
    return stage.diffusion_loss(net, batch["image"], rng, cond_emb=cond)


def temporal_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """Clips at a random fps, conditioned on their frames' mean CLIP image embedding (never text) and fps."""
    cond = rng.drop(stage.video_embedding(batch["video"], batch.get("clip_emb")), stage.cfg.diffusion.cond_drop_prob)
    return stage.diffusion_loss(net, batch["video"], rng, cond_emb=cond, fps=batch["fps"])


def known_frames(stage: Stage, video: torch.Tensor, rng: SampleRng) -> tuple[torch.Tensor, torch.Tensor]:
    """A random known-frame mask per sample -> F's extra channels (B, C+1, F, H, W) and masks (B, F)."""
    masks = rng.masks(video.shape[2], max(2, stage.cascade.shape.frame_skip))
    fill = stage.cfg.known_fill
    extra = torch.cat([interpolation_channels(video[i:i + 1], m.to(video.device), fill) for i, m in enumerate(masks)])
    return extra, torch.stack(masks).to(video.device)


def with_extra(net: Callable, extra: torch.Tensor) -> Callable:
    """F's network as a function of x_t alone: the known frames and mask ride along as input channels."""
    return lambda x, t, **kw: net(torch.cat([x, extra.to(x.dtype)], dim=1), t, **kw)


def interpolation_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """Clips with random known frames (interpolation at variable skips, extrapolation, animation);
    the loss covers every frame, known ones included."""
    video = batch["video"]
    extra, _ = known_frames(stage, video, rng)
    cond = rng.drop(stage.video_embedding(video, batch.get("clip_emb")), stage.cfg.diffusion.cond_drop_prob)
    return stage.diffusion_loss(with_extra(net, extra), video, rng, cond_emb=cond, fps=batch["fps"])


def _sr_pair(stage: Stage, batch: Batch, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(high, clean low, is_video) from a clip or an image batch (training.routing), the low side at the stage's
    ratio (sr_low: base / sr_low_size, sr_high: sr_low / sr_high_size) of the high one, crops included."""
    s, video = stage.cascade.shape, "video" in batch
    high = (batch["video"] if video else batch["image"])[:n]
    low, top = (s.base_size, s.sr_low_size) if stage.name == "sr_low" else (s.sr_low_size, s.sr_high_size)
    return high, downsample(high, high.shape[-1] * low // top), video


def sr_loss(stage: Stage, net: nn.Module, batch: Batch, rng: SampleRng) -> torch.Tensor:
    """Super-resolution from a noise-augmented low-res copy, conditioned on the CLIP image embedding;
    a residual stage learns the difference to the clean input's upsample."""
    high, low, video = _sr_pair(stage, batch)
    base = residual_base(stage.cfg.diffusion, low, high.shape[-1])
    low, t_aug = rng.augment(low, stage.cfg.diffusion.noise_aug_max, stage.schedule)
    emb = stage.video_embedding(high, batch.get("clip_emb")) if video else batch["image_emb"]
    cond = rng.drop(emb, stage.cfg.diffusion.cond_drop_prob)
    x0 = high if base is None else high - base
    # An image batch skips the temporal layers: sr_low's image steps leave them at their identity start.
    time = {"fps": batch["fps"]} if video else {"enable_time": False}
    return stage.diffusion_loss(net, x0, rng, cond_emb=cond, lowres=low, noise_level=t_aug, **time)


# --- previews: a few cheap sampler steps on the EMA net, logged as images/GIFs or metrics ---------------

Preview = dict[str, Any]  # {"images": (N, 3, H, W)} | {"video": (N, 3, F, H, W)} | {"metrics": {name: float}}


def clip_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    """In-batch retrieval: the share of images whose best-matching caption is their own."""
    model = net.model
    with torch.no_grad():
        img = _clip_api().encode_images(model, to_unit(batch["image"]))  # (B, D)
        txt = model.encode_text(batch["tokens"], normalize=True)  # (B, D)
    hits = (img @ txt.T).argmax(dim=1) == torch.arange(img.shape[0], device=img.device)
    return {"metrics": {"retrieval_top1": float(hits.float().mean())}}


def prior_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    """Cosine similarity between sampled and true image embeddings of the batch's captions."""
    tokens = batch["tokens"][:2]
    with torch.no_grad():
        feats = _clip_api().encode_text_tokens(stage.clip, tokens).float()
    kw = {"text_emb": batch["text_emb"][:2], "text_tokens": feats, "text_mask": tokens != 0}
    emb = stage.draw(net, (tokens.shape[0], stage.cascade.prior.net.embed_dim), gen, tokens.device, model_kwargs=kw)
    cos = Fn.cosine_similarity(emb, batch["image_emb"][:2], dim=-1).mean()
    return {"metrics": {"sample_cos": float(cos)}}


def decoder_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    real = batch["image"][:2]
    fake = stage.draw(net, tuple(real.shape), gen, real.device, model_kwargs={"cond_emb": batch["image_emb"][:2]})
    return {"images": torch.cat([real, fake.clamp(-1, 1)])}


def temporal_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    real = batch["video"][:2]
    kw = {"cond_emb": stage.video_embedding(real, batch.get("clip_emb")), "fps": batch["fps"][:2]}
    return {"video": stage.draw(net, tuple(real.shape), gen, real.device, model_kwargs=kw).clamp(-1, 1)}


def interpolation_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    """The clip's known frames held (the samplers' x_known/mask hooks), the others generated."""
    real = batch["video"][:2]
    extra, masks = known_frames(stage, real, SampleRng(batch["seed"][:2]))
    kw = {"cond_emb": stage.video_embedding(real, batch.get("clip_emb")), "fps": batch["fps"][:2]}
    out = stage.draw(with_extra(net, extra), tuple(real.shape), gen, real.device, model_kwargs=kw,
                     x_known=real, mask=masks[:, None, :, None, None])
    return {"video": out.clamp(-1, 1)}


def sr_preview(stage: Stage, net: nn.Module, batch: Batch, gen: torch.Generator) -> Preview:
    high, low, video = _sr_pair(stage, batch, 2)
    base = residual_base(stage.cfg.diffusion, low, high.shape[-1])
    emb = stage.video_embedding(high, batch.get("clip_emb")) if video else batch["image_emb"][:2]
    kw: dict[str, Any] = {"lowres": low, "cond_emb": emb,
                          **({"fps": batch["fps"][:2]} if video else {"enable_time": False})}
    out = around_base(lambda **hooks: stage.draw(net, tuple(high.shape), gen, high.device, model_kwargs=kw,
                                                 **hooks), base).clamp(-1, 1)
    return {"video": out} if video else {"images": torch.cat([high, out])}


# --- the table of stages -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    name: str
    data: Literal["images", "videos"]
    view: Callable[[CascadeConfig], ImageView | VideoView]
    loss: Callable[[Stage, nn.Module, Batch, SampleRng], torch.Tensor]
    preview: Callable[[Stage, nn.Module, Batch, torch.Generator], Preview]
    init_from: str | None = None  # the registered stage whose weights this one starts from
    frozen_clip: bool = False  # computes CLIP features on the fly


SPECS: dict[str, StageSpec] = {
    "clip": StageSpec("clip", "images", lambda c: ImageView(c.clip.image_size, False, True),
                      clip_stage_loss, clip_preview),
    "prior": StageSpec("prior", "images", lambda c: ImageView(None, True, True), prior_loss, prior_preview,
                       frozen_clip=True),
    "decoder": StageSpec("decoder", "images", lambda c: ImageView(c.shape.base_size, True, False),
                         decoder_loss, decoder_preview),
    "temporal": StageSpec("temporal", "videos", lambda c: VideoView(c.shape.base_size, c.shape.frames),
                          temporal_loss, temporal_preview, init_from="decoder", frozen_clip=True),
    "interpolation": StageSpec("interpolation", "videos", lambda c: VideoView(c.shape.base_size, c.shape.frames),
                               interpolation_loss, interpolation_preview, init_from="temporal", frozen_clip=True),
    "sr_low": StageSpec("sr_low", "videos", lambda c: VideoView(c.shape.sr_low_size, c.shape.frames),
                        sr_loss, sr_preview, frozen_clip=True),
    "sr_high": StageSpec("sr_high", "images", lambda c: ImageView(c.shape.sr_high_size, True, False),
                         sr_loss, sr_preview),
}


def stage_spec(name: str) -> StageSpec:
    if name not in SPECS:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(SPECS)}")
    return SPECS[name]


def requires(name: str, cascade: CascadeConfig) -> tuple[str, ...]:
    """Registered stages this one loads: the one it starts from, and CLIP when it computes CLIP features
    and no pretrained CLIP file is configured (then the toy world's trained CLIP is used)."""
    spec = stage_spec(name)
    deps = [spec.init_from] if spec.init_from else []
    if spec.frozen_clip and cascade.clip.weights_path is None:
        deps.append("clip")
    return tuple(deps)


Loader = Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]]]  # stage -> (state_dict, metadata)


def _saved_net_config(metadata: Mapping[str, Any], stage: str, cascade: CascadeConfig) -> UNetConfig:
    """The net config a registered checkpoint was saved with (its metadata), else this cascade's."""
    cfg = metadata.get("config")
    net = cfg.get("cascade", {}).get(stage, {}).get("net") if isinstance(cfg, Mapping) else None
    return UNetConfig.model_validate(net) if net else getattr(cascade, stage).net


def build_trainable(spec: StageSpec, cascade: CascadeConfig, load: Loader) -> nn.Module:
    """The module the optimiser trains: fresh, or inflated from the stage it starts from."""
    if spec.name == "clip":
        return ClipModule(_clip_api().build_clip(cascade.clip)[0].train())
    if spec.init_from is None:
        return build_network(spec.name, cascade)
    state, meta = load(spec.init_from)
    source = _saved_net_config(meta, spec.init_from, cascade)
    return inflate_state_dict(state, source, getattr(cascade, spec.name).net)


def build_frozen_clip(cascade: CascadeConfig, load: Loader, device: torch.device) -> nn.Module:
    """CLIP for on-the-fly features: the configured pretrained file, else the registered clip stage."""
    model = _clip_api().build_clip(cascade.clip, device=device)[0]
    if cascade.clip.weights_path is None:
        model.load_state_dict(load("clip")[0])
    return model.requires_grad_(False).eval()


def build_stage(name: str, cascade: CascadeConfig, load: Loader,
                device: torch.device | str = "cpu") -> tuple[Stage, nn.Module]:
    """-> (the stage with its frozen parts on `device`, the trainable module on CPU)."""
    spec = stage_spec(name)
    trainable = build_trainable(spec, cascade, load)  # first: its init follows the caller's seed alone
    clip = build_frozen_clip(cascade, load, torch.device(device)) if spec.frozen_clip else None
    return Stage(spec, cascade, clip), trainable


def weights_module(module: nn.Module) -> nn.Module:
    """What is saved and registered: the CLIP model itself for the clip stage, the net otherwise."""
    return module.model if isinstance(module, ClipModule) else module


def after_step(module: nn.Module) -> None:
    """CLIP's temperature is clamped after every step, as CLIP and open_clip's loop do (at most 100)."""
    if isinstance(module, ClipModule):
        with torch.no_grad():
            module.model.logit_scale.clamp_(0, math.log(100.0))
