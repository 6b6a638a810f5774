"""Samplers for the discrete-time diffusion of `model.diffusion`: plain functions, one per paper algorithm,
in k-diffusion's shape.

    denoiser = Denoiser(model, schedule, prediction, guidance_scale=..., x_known=..., mask=...)
    x, ts = start_state(denoiser, shape_or_x_T, steps, generator=..., x_init=..., strength=...)
    x0 = sample_ddim(denoiser, x, ts, extra_args=model_kwargs, callback=..., noise_sampler=..., eta=0.0)

Every sampler is `sample_X(denoiser, x, ts, extra_args=None, callback=None, noise_sampler=None, <its own
parameters>)` and returns the clean sample, shaped like x. It visits the timestep indices `ts` (descending,
from `timestep_sequence`); the step after the last one goes to the clean data. Fewer steps than T respace
the schedule (Nichol & Dhariwal 2021 sec. 4): each step uses alpha_bar at its two end points.
- `denoiser(x, t, **extra_args) -> (x0, eps)`: a `Denoiser`, which calls `model(x_t, t, **extra_args)` with
  t a LongTensor (B,) of timestep indices (the convention of `model.diffusion`) and knows the schedule.
- `callback(step, t, x, x0)` after every step, with x the new state and x0 this step's estimate.
- `noise_sampler(t, t_next) -> noise` shaped like x, for the stochastic steps (DDPM, DDIM with eta > 0);
  `default_noise_sampler(x, generator, frame_share)` draws a video's mixed noise (`randn_like`).
`sample(model, schedule, sampler_cfg, ...)` does all three from a SamplerConfig.

The Denoiser applies, to the clean-data estimate x0 of every step:
- classifier-free guidance (`guidance_scale` != 1 with `uncond_kwargs`, via `diffusion.cfg_model`);
- `denoised_fn(x0, t) -> x0`: edit the estimate (e.g. clamp images to [-1, 1]);
- `x_known`, `mask` (broadcastable to x; nonzero = known): the known entries of x0 are replaced by
  `x_known` and the noise estimate is re-derived from the edited x0 and x_t, so the known entries of x_t
  stay exactly `a*x_known + s*noise` along the trajectory and the final sample holds them exactly
  (`start_state` noises them alike). This is how the interpolation stage keeps its given frames (mask over
  the frame axis of (B, C, F, H, W)) and image animation holds the first frame.
- `known_guidance` w > 0 (with `x_known`, `mask`): reconstruction guidance (Ho et al. 2022, "Video Diffusion
  Models", sec. 3.1): the unknown entries of x0 become x0 - (w * a_t / 2) * grad_{x_t} ||x_known - x0||^2
  over the known entries, so they move toward what makes the network's own estimate of the known ones right,
  not only sit beside them (replacement alone leaves them free to ignore the known frames). One backward pass
  through the model per step; 0 (the default) is replacement alone. `known_guidance_min_t` k: only the steps
  at timestep indices >= k are guided; near the clean end the step goes straight into the sample, as
  high-frequency speckle on the entries next to the known ones.

`start_state` also does SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations"): with `x_init` and `strength` < 1 the steps span the lowest
round(strength*T) indices and the start is x_init noised to the first of them. `frame_share`: the starting
noise of a video is `randn_like(..., frame_share)`'s mixed noise; give the value the stage was trained with.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping, Sequence

import torch

from model.config import SamplerConfig
from model.diffusion import (Prediction, Schedule, cfg_model, eps_from_x0, output_to_eps, output_to_x0,
                             randn_like)

Model = Callable[..., torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
DenoisedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[int, int], torch.Tensor]


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


class Denoiser:
    """The network as the samplers see it: `denoiser(x_t, t, **model_kwargs) -> (x0, eps)` at timestep index
    t (an int), with guidance, denoised_fn and the known entries of the module docstring applied."""

    def __init__(self, model: Model, schedule: Schedule, prediction: Prediction = "eps", *,
                 guidance_scale: float = 1.0, uncond_kwargs: Mapping | None = None,
                 x_known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 known_guidance: float = 0.0, known_guidance_min_t: int = 0,
                 denoised_fn: DenoisedFn | None = None):
        if guidance_scale != 1.0 and uncond_kwargs is None:
            raise ValueError(f"guidance_scale {guidance_scale} needs uncond_kwargs")
        if (x_known is None) != (mask is None):
            raise ValueError("x_known and mask go together: pass both or neither")
        if known_guidance < 0 or (known_guidance and x_known is None):
            raise ValueError(f"known_guidance must be >= 0 and needs x_known and mask, got {known_guidance}")
        if not 0 <= known_guidance_min_t <= schedule.timesteps:
            raise ValueError(f"known_guidance_min_t must be in 0..{schedule.timesteps}, got {known_guidance_min_t}")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.guidance_scale, self.uncond_kwargs = guidance_scale, uncond_kwargs
        self.x_known, self.denoised_fn, self.guidance = x_known, denoised_fn, float(known_guidance)
        self.guidance_min_t = known_guidance_min_t
        self.known = None if mask is None else mask.to(torch.bool)
        self._guided: tuple[tuple, Model] | None = None

    def _net(self, model_kwargs: Mapping) -> Model:
        """The guided network for these kwargs, built once per condition rather than every step (the samplers
        pass the same tensors at each step; building concatenates the two branches' conditions)."""
        key = tuple(model_kwargs.items())  # holds the tensors, so an identity match is never a reused address
        cached = self._guided
        if cached is None or len(cached[0]) != len(key) or any(
                k1 != k2 or v1 is not v2 for (k1, v1), (k2, v2) in zip(cached[0], key)):
            self._guided = cached = (key, cfg_model(self.model, self.guidance_scale, model_kwargs,
                                                    self.uncond_kwargs or {}))
        return cached[1]

    def __call__(self, x: torch.Tensor, t: int, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.schedule.alpha_sigma_at(t)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        out, x0 = self._estimate(self._net(model_kwargs), x, t_batch, a, s, self.guidance if t >= self.guidance_min_t else 0.0)
        if self.denoised_fn is None and self.known is None:
            return x0, output_to_eps(self.prediction, out, x, a, s)
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0, t_batch)
        if self.known is not None:
            x0 = torch.where(self.known.to(x0.device), self.x_known.to(x0), x0)
        return x0, eps_from_x0(x0, x, a, s)

    def _estimate(self, net: Model, x: torch.Tensor, t_batch: torch.Tensor, a: float, s: float, guidance: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(network output, x0 estimate); with reconstruction `guidance` > 0, x0 moved by it (its known
        entries are replaced by the caller afterwards, so the step applies everywhere)."""
        with torch.enable_grad() if guidance else contextlib.nullcontext():
            x_in = x.detach().requires_grad_(True) if guidance else x
            out = net(x_in, t_batch).to(x.dtype)
            if out.shape != x.shape:
                raise ValueError(f"model output {tuple(out.shape)} does not match x {tuple(x.shape)}")
            x0 = output_to_x0(self.prediction, out, x_in, a, s)
            if not guidance:
                return out, x0
            error = ((x0 - self.x_known.to(x0)) ** 2 * self.known.to(x0)).sum()
            grad, = torch.autograd.grad(error, x_in)
        return out.detach(), x0.detach() - (guidance * a / 2) * grad


@torch.no_grad()
def start_state(denoiser: Denoiser, shape_or_x_T: Sequence[int] | torch.Tensor, steps: int, *,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, frame_share: float = 0.0, x_init: torch.Tensor | None = None,
                strength: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """(x, ts): the `steps` indices to visit and the state at the first of them: the given x_T or fresh
    noise, with x_init (SDEdit, strength < 1) a*x_init + s*noise, the denoiser's known entries
    a*x_known + s*noise."""
    if strength < 1.0 and x_init is None:
        raise ValueError(f"strength {strength} < 1 starts from a noised x_init; pass one")
    ts = timestep_sequence(denoiser.schedule.timesteps, steps, strength)
    noise = shape_or_x_T if isinstance(shape_or_x_T, torch.Tensor) else randn_like(
        torch.empty(tuple(shape_or_x_T), device=device, dtype=dtype), generator, frame_share)
    if denoiser.known is None and x_init is None:
        return noise, ts
    a, s = denoiser.schedule.alpha_sigma_at(ts[0])
    x = noise if x_init is None else a * x_init.to(noise) + s * noise
    if denoiser.known is not None:
        x = torch.where(denoiser.known.to(noise.device), a * denoiser.x_known.to(noise) + s * noise, x)
    return x, ts


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None,
                          frame_share: float = 0.0) -> NoiseSampler:
    """Fresh noise shaped like x for every stochastic step, from `generator` (a video's mixed noise with
    frame_share > 0, see `randn_like`)."""
    return lambda t, t_next: randn_like(x, generator, frame_share)


def _with_next(ts: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(step, t, t_next) for each visited index; -1 after the last one is the clean data."""
    return ((i, t, ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts))


def _alpha_bar(schedule: Schedule, t: int) -> float:
    """alpha_bar at index t as a Python float; -1 is the clean data (alpha_bar = 1)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[int], extra_args: Mapping | None = None,
                callback: Callback | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling, Ho et al. 2020 "Denoising Diffusion Probabilistic Models", Algorithm 2.

    Each step draws x_s ~ q(x_s | x_t, x0_hat), the Gaussian posterior with mean
    sqrt(ab_s) b/(1-ab_t) x0_hat + sqrt(1-b) (1-ab_s)/(1-ab_t) x_t and the "fixed small" variance
    b (1-ab_s)/(1-ab_t), where b = 1 - ab_t/ab_s (for steps == T, b is the schedule's beta_t).
    With steps < T this is the respaced DDPM of Nichol & Dhariwal 2021. The last step returns the mean."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, t, t_next in _with_next(ts):
        ab_t, ab_s = _alpha_bar(denoiser.schedule, t), _alpha_bar(denoiser.schedule, t_next)
        beta = 1 - ab_t / ab_s
        x0, _ = denoiser(x, t, **extra_args)
        x = (math.sqrt(ab_s) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)) * x
        if t_next >= 0:
            x = x + math.sqrt(beta * (1 - ab_s) / (1 - ab_t)) * noise_sampler(t, t_next)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[int], extra_args: Mapping | None = None,
                callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """Song, Meng & Ermon 2021 "Denoising Diffusion Implicit Models", eq. 12 with sigma from eq. 16:

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1-ab_s)/(1-ab_t)) sqrt(1 - ab_t/ab_s).
    eta = 0 is the deterministic DDIM (a first-order solver of the probability-flow ODE); eta = 1 matches
    the DDPM posterior."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i, t, t_next in _with_next(ts):
        ab_t, ab_s = _alpha_bar(denoiser.schedule, t), _alpha_bar(denoiser.schedule, t_next)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
        x0, eps = denoiser(x, t, **extra_args)
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise_sampler(t, t_next)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, ts: Sequence[int], extra_args: Mapping | None = None,
                    callback: Callback | None = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2: a second-order multistep solver of the probability-flow ODE in
    the data prediction, with lambda = log(a/s) and h = lambda_s - lambda_t:

    x_s = (s_s/s_t) x_t - a_s (exp(-h) - 1) D,  D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev,
    r = h_prev / h; the first step uses D = x0_hat_t (DPM-Solver++(1) = DDIM). As in k-diffusion, the
    final step to the clean data (s = 0) returns x0_hat. Deterministic given x_T: noise_sampler is unused."""
    extra_args = extra_args or {}
    x0_prev, h_prev = None, None
    for i, t, t_next in _with_next(ts):
        x0, _ = denoiser(x, t, **extra_args)
        if t_next < 0:
            x = x0
        else:
            a_t, s_t = denoiser.schedule.alpha_sigma_at(t)
            a_s, s_s = denoiser.schedule.alpha_sigma_at(t_next)
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
           uncond_kwargs: Mapping | None = None, *, callback: Callback | None = None,
           x_known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           denoised_fn: DenoisedFn | None = None, known_guidance: float = 0.0, known_guidance_min_t: int = 0,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, frame_share: float = 0.0,
           x_init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Run the sampler a SamplerConfig names, with its steps, eta and guidance scale: the `Denoiser`,
    `start_state` and `default_noise_sampler` (all drawing from `generator`) built from the arguments.

    guidance_scale != 1 needs uncond_kwargs: model_kwargs with the condition replaced by its null
    (`diffusion.null_condition`). noise_aug_level is not applied here: the SR stage noises its low-res input
    with `diffusion.noise_augment` and passes it in model_kwargs; frame_share is the stage's
    DiffusionConfig.frame_noise_share, which training used too."""
    denoiser = Denoiser(model, schedule, prediction, guidance_scale=sampler_cfg.guidance_scale,
                        uncond_kwargs=uncond_kwargs, x_known=x_known, mask=mask, known_guidance=known_guidance,
                        known_guidance_min_t=known_guidance_min_t, denoised_fn=denoised_fn)
    x, ts = start_state(denoiser, shape_or_x_T, sampler_cfg.steps, generator=generator, device=device, dtype=dtype,
                        frame_share=frame_share, x_init=x_init, strength=strength)
    own = {"eta": sampler_cfg.eta} if sampler_cfg.name == "ddim" else {}
    return SAMPLERS[sampler_cfg.name](denoiser, x, ts, model_kwargs, callback,
                                      default_noise_sampler(x, generator, frame_share), **own)
