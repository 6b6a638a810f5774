"""The Gaussian diffusion process beside the networks: schedules, forward noising, the training loss,
conversions between parameterisations, classifier-free guidance and noise-conditioning augmentation.

Conventions (every network and sampler of the cascade follows them):
- Time is DISCRETE. `t` is a LongTensor of shape (B,) holding timestep indices 0..T-1, as in DDPM,
  guided-diffusion and DiT. Index 0 is the least noisy step (alpha_bar[0] close to 1), T-1 the noisiest.
  Networks are called `model(x_t, t, **model_kwargs)` and embed `t` themselves (sinusoidal features of
  the index); they know nothing else about the schedule.
- `x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps`. We write `a = sqrt(alpha_bar_t)`,
  `s = sqrt(1 - alpha_bar_t)`; so `a**2 + s**2 == 1` (variance preserving).
- A network predicts one of: "eps" (the noise), "x0" (the clean data) or "v" = a*eps - s*x0
  (Salimans & Ho 2022). All three are affine in the network output for fixed (x_t, t), which is why
  guidance can be applied to whichever one the network predicts.
- Tensors of any rank work: images (B, C, H, W), videos (B, C, F, H, W), embeddings (B, D); per-sample
  coefficients are broadcast over every dimension after the batch.
- The null condition for classifier-free guidance is ZEROS (see `drop_condition`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F

from model.config import DiffusionConfig
from model.layers import resize

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS = ("eps", "v", "x0")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule. Tensors are float64 on CPU; they are cast to the data's dtype and device
    only when gathered, so one schedule serves fp32/bf16 and CPU/GPU alike."""

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) alpha_bar_t

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def alpha_sigma_at(self, t: int) -> tuple[float, float]:
        """(a, s) at one step as Python floats; t == -1 is the clean data (a=1, s=0). Samplers use this."""
        if t < 0:
            return 1.0, 0.0
        ab = float(self.alphas_cumprod[t])
        return math.sqrt(ab), math.sqrt(1.0 - ab)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at
    0.999 so the last step stays finite."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020: betas from 1e-4 to 0.02 over 1000 steps, rescaled so any T covers the same range of
    noise (guided-diffusion's convention)."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    betas = cosine_betas(cfg.timesteps) if cfg.schedule == "cosine" else linear_betas(cfg.timesteps)
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0))


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather per-sample values at indices t (B,) and shape them (B, 1, ..., 1) to broadcast against `like`."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    out = values.to(t.device)[t.long()].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def alpha_sigma(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample a = sqrt(alpha_bar_t) and s = sqrt(1 - alpha_bar_t), shaped (B, 1, ..., 1)."""
    ab = _extract(schedule.alphas_cumprod, t, like)
    return ab.sqrt(), (1 - ab).sqrt()


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None, frame_share: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device (so a CPU generator seeds CUDA runs
    reproducibly) and moved to x's device. For a video x (B, C, F, H, W) and frame_share r > 0 (Ge et al.
    2023, "Preserve Your Own Correlation", mixed noise): sqrt(r) * one draw shared by the clip's frames +
    sqrt(1 - r) * one draw per frame, so each frame is still N(0, I) and two frames correlate by r."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    if frame_share > 0 and x.ndim == 5:
        shared = torch.randn((*x.shape[:2], 1, *x.shape[3:]), generator=generator, device=device, dtype=torch.float32)
        noise = math.sqrt(frame_share) * shared + math.sqrt(1 - frame_share) * noise
    return noise.to(device=x.device, dtype=x.dtype)


def sample_timesteps(schedule: Schedule, batch: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform training timesteps: LongTensor (B,) in 0..T-1."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.timesteps, (batch,), generator=generator, device=gen_device)
    return t.to(device)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = a*x0 + s*noise."""
    a, s = alpha_sigma(schedule, t, x0)
    return a * x0 + s * noise


# --- conversions between parameterisations -------------------------------------------------------

def target_for(prediction: Prediction, x0: torch.Tensor, noise: torch.Tensor,
               a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a network with this parameterisation should output for (x0, noise) at (a, s)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * noise - s * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def output_to_x0(prediction: Prediction, out: torch.Tensor, x_t: torch.Tensor,
                 a: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
    """Clean-data estimate from the network output. eps: (x_t - s*eps)/a; v: a*x_t - s*v."""
    if prediction == "x0":
        return out
    if prediction == "eps":
        return (x_t - s * out) / a
    if prediction == "v":
        return a * x_t - s * out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def output_to_eps(prediction: Prediction, out: torch.Tensor, x_t: torch.Tensor,
                  a: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
    """Noise estimate from the network output. x0: (x_t - a*x0)/s; v: s*x_t + a*v."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - a * out) / s
    if prediction == "v":
        return s * x_t + a * out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor | float,
                s: torch.Tensor | float) -> torch.Tensor:
    """The noise that, with x0, gives x_t. Samplers re-derive eps this way after x0 was edited
    (clipped, known frames put back), so the two estimates stay consistent."""
    return (x_t - a * x0) / s


# --- training --------------------------------------------------------------------------------------

def training_loss(model: Callable[..., torch.Tensor], schedule: Schedule, x0: torch.Tensor,
                  t: torch.Tensor | None = None, model_kwargs: Mapping | None = None,
                  prediction: Prediction = "eps", generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the network output at (x_t, t) and its target (Ho et al. 2020's
    "simple" loss; for v and x0 the same MSE on the other target). `t=None` draws uniform timesteps and
    `noise=None` draws fresh noise, both from `generator`. Returns a scalar."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if t is None:
        t = sample_timesteps(schedule, x0.shape[0], x0.device, generator)
    if noise is None:
        noise = randn_like(x0, generator)
    a, s = alpha_sigma(schedule, t, x0)
    x_t = a * x0 + s * noise
    out = model(x_t, t, **(model_kwargs or {}))
    if out.shape != x0.shape:
        raise ValueError(f"model output {tuple(out.shape)} does not match data {tuple(x0.shape)}")
    return F.mse_loss(out.float(), target_for(prediction, x0, noise, a, s).float())


def drop_condition(cond: torch.Tensor | Mapping[str, torch.Tensor], p: float,
                   generator: torch.Generator | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Classifier-free guidance training (Ho & Salimans 2022): replace the condition of each sample by the
    null condition with probability p. The null condition is ZEROS (a zero CLIP embedding, all-zero text
    tokens = open_clip's padding id), so sampling's unconditional branch is `torch.zeros_like(cond)`.
    A mapping is dropped with one shared per-sample mask, so e.g. the prior's text tokens and text
    embedding vanish together; pass only the entries that are the condition (not fps, not low-res input)."""
    tensors = dict(cond) if isinstance(cond, Mapping) else {"": cond}
    batch = {v.shape[0] for v in tensors.values()}
    if len(batch) != 1:
        raise ValueError(f"condition tensors disagree on batch size: {sorted(batch)}")
    (b,) = batch
    gen_device = generator.device if generator is not None else "cpu"
    keep_b = torch.rand(b, generator=generator, device=gen_device) >= p  # (B,) True = keep
    dropped = {}
    for key, value in tensors.items():
        keep = keep_b.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        dropped[key] = torch.where(keep, value, torch.zeros_like(value))
    return dropped if isinstance(cond, Mapping) else dropped[""]


def null_condition(cond: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The unconditional counterpart of `cond` under `drop_condition`'s convention: zeros."""
    if isinstance(cond, Mapping):
        return {k: torch.zeros_like(v) for k, v in cond.items()}
    return torch.zeros_like(cond)


def _concat_kwargs(cond_kwargs: Mapping, uncond_kwargs: Mapping) -> dict:
    """Stack cond and uncond kwargs along the batch; non-tensor values (None, ints) must agree."""
    if set(cond_kwargs) != set(uncond_kwargs):
        raise ValueError(f"cond and uncond kwargs differ in keys: {sorted(set(cond_kwargs) ^ set(uncond_kwargs))}")
    merged = {}
    for key, c in cond_kwargs.items():
        u = uncond_kwargs[key]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            merged[key] = torch.cat([c, u], dim=0)
        elif not isinstance(c, torch.Tensor) and not isinstance(u, torch.Tensor) and (c is u or c == u):
            merged[key] = c
        else:
            raise ValueError(f"kwarg {key!r}: non-tensor values must be equal in cond and uncond")
    return merged


def cfg_model(model: Callable[..., torch.Tensor], scale: float, cond_kwargs: Mapping,
              uncond_kwargs: Mapping) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022) as a model: out = u + scale * (c - u).

    The returned callable takes (x_t, t) and runs the conditional and unconditional branches in ONE
    batched forward (x and t doubled, kwargs concatenated along the batch). scale == 1 is exactly the
    conditional model: the unconditional branch is skipped, not computed and cancelled, so results are
    bit-identical to `model(x, t, **cond_kwargs)`. Guidance on the raw output is the same guidance on
    eps, x0 or v, since each is affine in the output for fixed (x_t, t)."""
    if scale == 1.0:
        return lambda x, t: model(x, t, **cond_kwargs)
    merged = _concat_kwargs(cond_kwargs, uncond_kwargs)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **merged)  # (2B, ...)
        cond, uncond = out.chunk(2, dim=0)
        return uncond + scale * (cond - uncond)

    return guided


# --- super-resolution noise-conditioning augmentation ---------------------------------------------

def aug_level_to_timestep(schedule: Schedule, level: torch.Tensor) -> torch.Tensor:
    """Augmentation level in [0, 1] -> timestep index round(level * (T-1)), LongTensor (B,)."""
    return (level.clamp(0, 1) * (schedule.timesteps - 1)).round().long()


def noise_augment(lowres: torch.Tensor, level: float | torch.Tensor, schedule: Schedule,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-conditioning augmentation of the SR low-res input (Ho et al. 2021, Cascaded Diffusion;
    Make-A-Video sec. 3.3): noise `lowres` to the level's timestep with the stage's own schedule and
    tell the network how much noise was added.

    level: a float for the whole batch or a (B,) tensor of floats in [0, 1]; training draws it uniformly
    in [0, noise_aug_max] (`random_aug_levels`), sampling uses SamplerConfig.noise_aug_level.
    Returns (noised lowres, t_aug) where t_aug is a LongTensor (B,) of timestep indices, the same
    convention as `t`: feed it to the network as conditioning. Level 0 leaves the input exactly clean."""
    b = lowres.shape[0]
    level_t = torch.as_tensor(level, dtype=torch.float64, device=lowres.device)
    level_t = level_t.expand(b) if level_t.ndim == 0 else level_t
    if level_t.shape != (b,):
        raise ValueError(f"level must be a float or shape ({b},), got {tuple(level_t.shape)}")
    t_aug = aug_level_to_timestep(schedule, level_t)
    noised = q_sample(schedule, lowres, t_aug, randn_like(lowres, generator))
    clean = (level_t == 0).reshape(-1, *([1] * (lowres.ndim - 1)))
    return torch.where(clean, lowres, noised), t_aug


def residual_base(cfg: DiffusionConfig, lowres: torch.Tensor, size: int) -> torch.Tensor | None:
    """What a residual SR stage's x0 is a difference to: the bilinear upsample of the clean low-res input
    to size x size (images or videos). None for a plain stage."""
    return resize(lowres, size) if cfg.residual else None


def residual_clamp(base: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The sampler's `denoised_fn` for a residual SR stage: the estimate x0 is a difference to `base`
    (the upsampled low-res input); clip base + x0 to the pixel range [-1, 1]."""
    return lambda x0, t: (base + x0).clamp(-1, 1) - base


def around_base(draw: Callable[..., torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """An SR sampler call `draw(**hooks)`; with a residual base it samples the difference (clipped by
    `residual_clamp`) and returns base + difference in the pixel range; without one, draw() as it is."""
    if base is None:
        return draw()
    return (base + draw(denoised_fn=residual_clamp(base))).clamp(-1, 1)


def random_aug_levels(batch: int, max_level: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time augmentation levels, uniform in [0, max_level]: float tensor (B,)."""
    gen_device = generator.device if generator is not None else device
    return (torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64) * max_level).to(device)
