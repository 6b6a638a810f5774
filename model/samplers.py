"""Samplers for the discrete-time diffusion of `model.diffusion`: plain functions, one per paper algorithm.

Every sampler has the signature
    sample_X(model, schedule, shape_or_x_T, steps, model_kwargs=None, prediction="eps", generator=None,
             callback=None, progress=False, x_known=None, mask=None, denoised_fn=None, known_guidance=0.0,
             known_guidance_min_t=0, device="cpu", ...)
and returns the clean sample x0, shaped like x_T. `model(x_t, t, **model_kwargs)` gets t as a LongTensor
(B,) of timestep indices (the convention of `model.diffusion`). For classifier-free guidance pass
`cfg_model(...)` as the model (or use `sample`, which does it from a SamplerConfig).

`steps` network evaluations visit the indices `timestep_sequence(T, steps)` (evenly spaced, starting at
T-1); the step after the last one goes to the clean data. Fewer steps than T respace the schedule
(Nichol & Dhariwal 2021 sec. 4): each step uses alpha_bar at its two end points.

Hooks, shared by all samplers, applied to the clean-data estimate x0 of every step:
- `denoised_fn(x0, t) -> x0`: edit the estimate (e.g. clamp images to [-1, 1]).
- `x_known`, `mask` (broadcastable to x; nonzero = known): the known entries of x0 are replaced by
  `x_known` and the noise estimate is re-derived from the edited x0 and x_t, so the known entries of x_t
  stay exactly `a*x_known + s*noise` along the trajectory and the final sample holds them exactly. The
  starting x_T gets the same treatment. This is how the interpolation stage keeps its given frames
  (mask over the frame axis of (B, C, F, H, W)) and image animation holds the first frame.
- `known_guidance` w > 0 (with `x_known`, `mask`): reconstruction guidance (Ho et al. 2022, "Video Diffusion
  Models", sec. 3.1): the unknown entries of x0 become x0 - (w * a_t / 2) * grad_{x_t} ||x_known - x0||^2
  over the known entries, so they move toward what makes the network's own estimate of the known ones right,
  not only sit beside them (replacement alone leaves them free to ignore the known frames). One backward pass
  through the model per step; 0 (the default) is replacement alone. `known_guidance_min_t` k: only the steps
  at timestep indices >= k are guided; near the clean end the step goes straight into the sample, as
  high-frequency speckle on the entries next to the known ones.
- `callback(step, t, x, x0)` after every step, with x the new state and x0 this step's estimate.
- `x_init`, `strength`: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
  Stochastic Differential Equations"): the steps span the lowest round(strength*T) indices and the start
  is x_init noised to the first of them; strength 1 with no x_init is plain sampling from noise.
- `frame_share`: the starting noise (and the fresh noise of DDPM / DDIM eta > 0 steps) of a video is
  `randn_like(..., frame_share)`'s mixed noise; give the value the stage was trained with.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

import torch

from model.config import SamplerConfig
from model.diffusion import (Prediction, Schedule, cfg_model, eps_from_x0, output_to_eps, output_to_x0,
                             randn_like)

Model = Callable[..., torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
DenoisedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timestep_sequence(num_timesteps: int, steps: int, strength: float = 1.0) -> list[int]:
    """`steps` descending indices, "trailing" spacing (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", sec. 3.3): round(T - i*T/steps) - 1, so sampling always starts at T-1,
    steps == T visits every index, and the last network call sits T/steps - 1 above index 0 rather than
    spending an evaluation at the almost-clean index 0. strength < 1 spaces them over the lowest
    round(strength*T) indices instead (SDEdit's partial trajectory)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    top = round(num_timesteps * strength)
    if not 1 <= steps <= top:
        raise ValueError(f"steps must be in 1..{top} ({num_timesteps} timesteps at strength {strength}), got {steps}")
    return [round(top * (1 - i / steps)) - 1 for i in range(steps)]


def _alpha_bar(schedule: Schedule, t: int) -> float:
    """alpha_bar at index t as a Python float; -1 is the clean data (alpha_bar = 1)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


class _Denoiser:
    """One network evaluation turned into (x0, eps) estimates, with the hooks of the module docstring."""

    def __init__(self, model: Model, schedule: Schedule, model_kwargs: Mapping | None, prediction: Prediction,
                 x_known: torch.Tensor | None, mask: torch.Tensor | None, denoised_fn: DenoisedFn | None,
                 known_guidance: float = 0.0, known_guidance_min_t: int = 0):
        if (x_known is None) != (mask is None):
            raise ValueError("x_known and mask go together: pass both or neither")
        if known_guidance < 0 or (known_guidance and x_known is None):
            raise ValueError(f"known_guidance must be >= 0 and needs x_known and mask, got {known_guidance}")
        if not 0 <= known_guidance_min_t <= schedule.timesteps:
            raise ValueError(f"known_guidance_min_t must be in 0..{schedule.timesteps}, got {known_guidance_min_t}")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.kwargs = dict(model_kwargs or {})
        self.x_known, self.denoised_fn, self.guidance = x_known, denoised_fn, float(known_guidance)
        self.guidance_min_t = known_guidance_min_t
        self.known = None if mask is None else mask.to(torch.bool)

    def start(self, noise: torch.Tensor, t: int, x_init: torch.Tensor | None = None) -> torch.Tensor:
        """The state at index t: the noise, or x_init noised to t (SDEdit); the known entries noised to t."""
        if self.known is None and x_init is None:
            return noise
        a, s = self.schedule.alpha_sigma_at(t)
        x = noise if x_init is None else a * x_init.to(noise) + s * noise
        if self.known is None:
            return x
        return torch.where(self.known.to(noise.device), a * self.x_known.to(noise) + s * noise, x)

    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.schedule.alpha_sigma_at(t)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        out, x0 = self._estimate(x, t_batch, a, s, self.guidance if t >= self.guidance_min_t else 0.0)
        if self.denoised_fn is None and self.known is None:
            return x0, output_to_eps(self.prediction, out, x, a, s)
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0, t_batch)
        if self.known is not None:
            x0 = torch.where(self.known.to(x0.device), self.x_known.to(x0), x0)
        return x0, eps_from_x0(x0, x, a, s)

    def _estimate(self, x: torch.Tensor, t_batch: torch.Tensor, a: float, s: float, guidance: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(network output, x0 estimate); with reconstruction `guidance` > 0, x0 moved by it (its known
        entries are replaced by the caller afterwards, so the step applies everywhere)."""
        with torch.enable_grad() if guidance else contextlib.nullcontext():
            x_in = x.detach().requires_grad_(True) if guidance else x
            out = self.model(x_in, t_batch, **self.kwargs).to(x.dtype)
            if out.shape != x.shape:
                raise ValueError(f"model output {tuple(out.shape)} does not match x {tuple(x.shape)}")
            x0 = output_to_x0(self.prediction, out, x_in, a, s)
            if not guidance:
                return out, x0
            error = ((x0 - self.x_known.to(x0)) ** 2 * self.known.to(x0)).sum()
            grad, = torch.autograd.grad(error, x_in)
        return out.detach(), x0.detach() - (guidance * a / 2) * grad


def _initial_noise(shape_or_x_T: Sequence[int] | torch.Tensor, generator: torch.Generator | None,
                   device: torch.device | str, dtype: torch.dtype, frame_share: float = 0.0) -> torch.Tensor:
    if isinstance(shape_or_x_T, torch.Tensor):
        return shape_or_x_T
    return randn_like(torch.empty(tuple(shape_or_x_T), device=device, dtype=dtype), generator, frame_share)


def _begin(denoise: _Denoiser, schedule: Schedule, shape_or_x_T: Sequence[int] | torch.Tensor, steps: int,
           generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype, frame_share: float,
           x_init: torch.Tensor | None, strength: float) -> tuple[list[int], torch.Tensor]:
    """The visited indices and the starting state: the noise (x_init noised to the first index when given),
    known entries put in."""
    if strength < 1.0 and x_init is None:
        raise ValueError(f"strength {strength} < 1 starts from a noised x_init; pass one")
    ts = timestep_sequence(schedule.timesteps, steps, strength)
    return ts, denoise.start(_initial_noise(shape_or_x_T, generator, device, dtype, frame_share), ts[0], x_init)


def _progress(ts: list[int], progress: bool):
    if not progress:
        return ts
    from tqdm.auto import tqdm  # only when asked: keeps the import optional
    return tqdm(ts)


@torch.no_grad()
def sample_ddpm(model: Model, schedule: Schedule, shape_or_x_T: Sequence[int] | torch.Tensor, steps: int,
                model_kwargs: Mapping | None = None, prediction: Prediction = "eps",
                generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
                x_known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                denoised_fn: DenoisedFn | None = None, known_guidance: float = 0.0, known_guidance_min_t: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, frame_share: float = 0.0,
                x_init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 "Denoising Diffusion Probabilistic Models", Algorithm 2.

    Each step draws x_s ~ q(x_s | x_t, x0_hat), the Gaussian posterior with mean
    sqrt(ab_s) b/(1-ab_t) x0_hat + sqrt(1-b) (1-ab_s)/(1-ab_t) x_t and the "fixed small" variance
    b (1-ab_s)/(1-ab_t), where b = 1 - ab_t/ab_s (for steps == T, b is the schedule's beta_t).
    With steps < T this is the respaced DDPM of Nichol & Dhariwal 2021. The last step returns the mean."""
    denoise = _Denoiser(model, schedule, model_kwargs, prediction, x_known, mask, denoised_fn, known_guidance,
                        known_guidance_min_t)
    ts, x = _begin(denoise, schedule, shape_or_x_T, steps, generator, device, dtype, frame_share, x_init, strength)
    for i, t in enumerate(_progress(ts, progress)):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        ab_t, ab_s = _alpha_bar(schedule, t), _alpha_bar(schedule, t_next)
        beta = 1 - ab_t / ab_s
        x0, _ = denoise(x, t)
        x_prev = x
        x = (math.sqrt(ab_s) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)) * x_prev
        if t_next >= 0:
            x = x + math.sqrt(beta * (1 - ab_s) / (1 - ab_t)) * randn_like(x, generator, frame_share)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(model: Model, schedule: Schedule, shape_or_x_T: Sequence[int] | torch.Tensor, steps: int,
                model_kwargs: Mapping | None = None, prediction: Prediction = "eps",
                generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
                x_known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                denoised_fn: DenoisedFn | None = None, known_guidance: float = 0.0, known_guidance_min_t: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, eta: float = 0.0,
                frame_share: float = 0.0, x_init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Song, Meng & Ermon 2021 "Denoising Diffusion Implicit Models", eq. 12 with sigma from eq. 16:

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1-ab_s)/(1-ab_t)) sqrt(1 - ab_t/ab_s).
    eta = 0 is the deterministic DDIM (a first-order solver of the probability-flow ODE); eta = 1 matches
    the DDPM posterior."""
    denoise = _Denoiser(model, schedule, model_kwargs, prediction, x_known, mask, denoised_fn, known_guidance,
                        known_guidance_min_t)
    ts, x = _begin(denoise, schedule, shape_or_x_T, steps, generator, device, dtype, frame_share, x_init, strength)
    for i, t in enumerate(_progress(ts, progress)):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        ab_t, ab_s = _alpha_bar(schedule, t), _alpha_bar(schedule, t_next)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x0, eps = denoise(x, t)
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator, frame_share)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, schedule: Schedule, shape_or_x_T: Sequence[int] | torch.Tensor, steps: int,
                    model_kwargs: Mapping | None = None, prediction: Prediction = "eps",
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    progress: bool = False, x_known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    denoised_fn: DenoisedFn | None = None, known_guidance: float = 0.0, known_guidance_min_t: int = 0,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, frame_share: float = 0.0,
                    x_init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2: a second-order multistep solver of the probability-flow ODE in
    the data prediction, with lambda = log(a/s) and h = lambda_s - lambda_t:

    x_s = (s_s/s_t) x_t - a_s (exp(-h) - 1) D,  D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev,
    r = h_prev / h; the first step uses D = x0_hat_t (DPM-Solver++(1) = DDIM). As in k-diffusion, the
    final step to the clean data (s = 0) returns x0_hat. Deterministic given x_T."""
    denoise = _Denoiser(model, schedule, model_kwargs, prediction, x_known, mask, denoised_fn, known_guidance,
                        known_guidance_min_t)
    ts, x = _begin(denoise, schedule, shape_or_x_T, steps, generator, device, dtype, frame_share, x_init, strength)
    x0_prev, h_prev = None, None
    for i, t in enumerate(_progress(ts, progress)):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x0, _ = denoise(x, t)
        if t_next < 0:
            x = x0
        else:
            a_t, s_t = schedule.alpha_sigma_at(t)
            a_s, s_s = schedule.alpha_sigma_at(t_next)
            h = math.log(a_s / s_s) - math.log(a_t / s_t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(model: Model, schedule: Schedule, sampler_cfg: SamplerConfig,
           shape_or_x_T: Sequence[int] | torch.Tensor, model_kwargs: Mapping | None = None,
           prediction: Prediction = "eps", generator: torch.Generator | None = None,
           uncond_kwargs: Mapping | None = None, **hooks) -> torch.Tensor:
    """Run the sampler a SamplerConfig names, with its steps, eta and guidance scale.

    guidance_scale != 1 wraps the model in `cfg_model(model, scale, model_kwargs, uncond_kwargs)`;
    uncond_kwargs are then required: model_kwargs with the condition replaced by its null
    (`diffusion.null_condition`). `hooks` pass through (callback, progress, x_known, mask, denoised_fn,
    device, dtype). noise_aug_level is not applied here: the SR stage noises its low-res input with
    `diffusion.noise_augment` and passes it in model_kwargs; frame_share is a hook (the stage's
    DiffusionConfig.frame_noise_share, which training used too)."""
    kwargs = dict(model_kwargs or {})
    net = model
    if sampler_cfg.guidance_scale != 1.0:
        if uncond_kwargs is None:
            raise ValueError(f"guidance_scale {sampler_cfg.guidance_scale} needs uncond_kwargs")
        net, kwargs = cfg_model(model, sampler_cfg.guidance_scale, kwargs, uncond_kwargs), {}
    if sampler_cfg.name == "ddim":
        hooks = {**hooks, "eta": sampler_cfg.eta}
    return SAMPLERS[sampler_cfg.name](net, schedule, shape_or_x_T, sampler_cfg.steps, kwargs, prediction,
                                      generator, **hooks)
