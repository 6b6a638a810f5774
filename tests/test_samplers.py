"""Samplers against an analytic case: data x0 ~ N(mu, sigma^2 I), whose exact denoiser is known in closed form,
so a correct sampler must return samples with mean mu and std sigma."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from model.config import DiffusionConfig, SamplerConfig
from model.diffusion import Schedule, alpha_sigma, make_schedule, null_condition, target_for
from model.samplers import (SAMPLERS, Denoiser, default_noise_sampler, sample, sample_ddim, sample_ddpm, start_state,
                            timestep_sequence)

MU, SIGMA = 1.5, 0.5
N, D = 2000, 4


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return make_schedule(DiffusionConfig(timesteps=1000, schedule="cosine"))


def gaussian_model(schedule: Schedule, prediction: str, mu: float = MU, sigma: float = SIGMA):
    """The optimal network for N(mu, sigma^2): E[x0 | x_t] = mu + a sigma^2 / (a^2 sigma^2 + s^2) (x_t - a mu),
    returned in the requested parameterisation. `mu` may be overridden per call (a conditioning kwarg)."""
    def model(x, t, mu=mu):
        a, s = alpha_sigma(schedule, t, x)
        x0 = mu + a * sigma**2 / (a**2 * sigma**2 + s**2) * (x - a * mu)
        return target_for(prediction, x0, (x - a * x0) / s, a, s)
    return model


def run(name: str, model, schedule: Schedule, shape_or_x_T, steps: int, prediction: str = "eps",
        generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """`sample` with the SamplerConfig of `name` and `steps`; `options` are its keyword arguments."""
    return sample(model, schedule, SamplerConfig(name=name, steps=steps), shape_or_x_T, prediction=prediction,
                  generator=generator, **options)


# (sampler, steps, tolerance on mean and std): ddpm needs many steps, the ODE solvers few.
CASES = [("ddpm", 1000, 0.03), ("ddim", 50, 0.03), ("dpmpp_2m", 20, 0.02)]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("name,steps,tol", CASES)
def test_sampler_recovers_the_gaussian(schedule, name, steps, tol, prediction):
    out = run(name, gaussian_model(schedule, prediction), schedule, (N, D), steps, prediction=prediction,
              generator=torch.Generator().manual_seed(0))
    assert out.shape == (N, D) and torch.isfinite(out).all()
    assert out.mean().item() == pytest.approx(MU, abs=tol)
    assert out.std().item() == pytest.approx(SIGMA, abs=tol)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_is_deterministic_given_the_generator(schedule, name):
    model = gaussian_model(schedule, "eps")
    draw = lambda seed: run(name, model, schedule, (8, 3, 2, 4, 4), 10, generator=torch.Generator().manual_seed(seed))
    first, again, other = draw(1), draw(1), draw(2)
    assert first.shape == (8, 3, 2, 4, 4)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_ddim_with_eta_one_is_ddpm(schedule):
    """DDIM's eta = 1 reproduces the DDPM posterior step for step, with the same noise draws."""
    model = gaussian_model(schedule, "v")
    denoiser = Denoiser(model, schedule, "v")
    x, ts = start_state(denoiser, (64, 4), 25, generator=torch.Generator().manual_seed(0))
    ddpm = sample_ddpm(denoiser, x, ts, noise_sampler=default_noise_sampler(x, torch.Generator().manual_seed(1)))
    ddim = sample_ddim(denoiser, x, ts, noise_sampler=default_noise_sampler(x, torch.Generator().manual_seed(1)),
                       eta=1.0)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_deterministic_samplers_map_x_T_to_the_same_x0(schedule):
    """Given x_T, DDIM (eta 0) and DPM-Solver++(2M) solve the same ODE; the exact solution for the Gaussian
    is x0 = mu + sigma * (x_T - a_T mu) / sqrt(a_T^2 sigma^2 + s_T^2) (the noise is transported linearly)."""
    x_T = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    a, s = schedule.alpha_sigma_at(999)
    exact = MU + SIGMA * (x_T - a * MU) / (a**2 * SIGMA**2 + s**2) ** 0.5
    denoiser = Denoiser(gaussian_model(schedule, "eps"), schedule)
    ode = {"dpmpp_2m": 50, "ddim": 200}
    for name, steps in ode.items():
        torch.testing.assert_close(SAMPLERS[name](denoiser, x_T, timestep_sequence(1000, steps)), exact, atol=0.03,
                                   rtol=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_known_frames_are_kept_exactly(schedule, name):
    """The interpolation/animation hook: the masked frames of a video come out exactly as given."""
    x_known = torch.rand(2, 3, 5, 4, 4) * 2 - 1  # (B, C, F, H, W)
    mask = torch.zeros(1, 1, 5, 1, 1)
    mask[:, :, [0, 4]] = 1  # first and last frame known
    steps: list[int] = []
    out = run(name, gaussian_model(schedule, "eps", mu=0.0), schedule, x_known.shape, 8,
              generator=torch.Generator().manual_seed(0), x_known=x_known, mask=mask,
              callback=lambda i, t, x, x0: steps.append(t))
    assert torch.equal(out[:, :, [0, 4]], x_known[:, :, [0, 4]])
    assert not torch.allclose(out[:, :, 1:4], x_known[:, :, 1:4])
    assert steps == timestep_sequence(1000, 8)


def still_video_denoiser(schedule):
    """The exact x0 denoiser of a world of still videos (every frame the same z ~ N(0, I))."""
    def still_videos(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = schedule.alpha_sigma_at(int(t[0]))
        return (a * x.sum(dim=2, keepdim=True) / (a * a * x.shape[2] + s * s)).expand_as(x)
    return still_videos


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reconstruction_guidance_stops_below_its_min_t(schedule, name):
    """`known_guidance_min_t` k: the steps at indices >= k take the backward pass and move the sample, the
    ones below do not; k = T is no guidance at all, bit for bit."""
    still_videos = still_video_denoiser(schedule)
    guided: dict[int, bool] = {}

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided[int(t[0])] = x.requires_grad
        return still_videos(x, t)

    x_known = torch.rand(4, 3, 5, 4, 4) * 2 - 1
    mask = torch.zeros(1, 1, 5, 1, 1)
    mask[:, :, 2] = 1
    guide = partial(run, name, schedule=schedule, shape_or_x_T=x_known.shape, steps=10, prediction="x0",
                    x_known=x_known, mask=mask)
    cut = guide(recording, generator=torch.Generator().manual_seed(0), known_guidance=5.0, known_guidance_min_t=300)
    assert guided == {t: t >= 300 for t in timestep_sequence(1000, 10)} and any(guided.values())
    plain = guide(still_videos, generator=torch.Generator().manual_seed(0))
    full = guide(still_videos, generator=torch.Generator().manual_seed(0), known_guidance=5.0)
    never = guide(still_videos, generator=torch.Generator().manual_seed(0), known_guidance=5.0,
                  known_guidance_min_t=1000)
    assert torch.equal(never, plain) and not torch.allclose(cut, plain) and not torch.allclose(cut, full)
    with pytest.raises(ValueError, match="known_guidance_min_t"):
        guide(still_videos, known_guidance=5.0, known_guidance_min_t=1001)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reconstruction_guidance_makes_unknown_frames_follow_the_known_one(schedule, name):
    """`known_guidance` on a world of still videos (every frame the same z ~ N(0, I)), whose exact denoiser
    couples the frames: E[z | x_t] = a sum_f x_t[f] / (a^2 F + s^2). Given frame 2, the exact conditional
    is every frame equal to it. Replacement alone leaves the other frames far from it (the known frame is
    one vote of five in the denoiser); reconstruction guidance brings them to it, the known frame still
    exact."""
    still_videos = still_video_denoiser(schedule)
    x_known = torch.rand(16, 3, 5, 4, 4) * 2 - 1  # (B, C, F, H, W)
    mask = torch.zeros(1, 1, 5, 1, 1)
    mask[:, :, 2] = 1
    gap = {}
    for weight in (0.0, 5.0):
        out = run(name, still_videos, schedule, x_known.shape, 20, prediction="x0", x_known=x_known,
                  mask=mask, generator=torch.Generator().manual_seed(0), known_guidance=weight)
        assert torch.equal(out[:, :, 2], x_known[:, :, 2])
        gap[weight] = (out - x_known[:, :, [2]]).abs().mean().item()
    assert gap[0.0] > 0.15 and gap[5.0] < 0.01
    with pytest.raises(ValueError, match="known_guidance"):
        run(name, still_videos, schedule, (2, 4), 4, known_guidance=1.0)  # nothing known to guide toward


@pytest.mark.parametrize("name,steps", [("ddim", 200), ("dpmpp_2m", 50)])
def test_sdedit_start_solves_from_the_noised_x_init(schedule, name, steps):
    """strength < 1: the ODE starts at index round(strength*T)-1 from a x_init + s x_T, so for the Gaussian
    the exact answer is mu + sigma (x_start - a mu) / sqrt(a^2 sigma^2 + s^2) there - near x_init for a low
    strength, unlike the same noise sampled from T."""
    x_T = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    x_init = torch.full((500, 4), 2.5)
    visited: list[int] = []
    out = run(name, gaussian_model(schedule, "eps"), schedule, x_T, steps, x_init=x_init, strength=0.3,
              callback=lambda i, t, x, x0: visited.append(t))
    assert visited == timestep_sequence(1000, steps, 0.3) and visited[0] == 299
    a, s = schedule.alpha_sigma_at(299)
    x_start = a * x_init + s * x_T
    exact = MU + SIGMA * (x_start - a * MU) / (a**2 * SIGMA**2 + s**2) ** 0.5
    torch.testing.assert_close(out, exact, atol=0.03, rtol=0)
    from_noise = run(name, gaussian_model(schedule, "eps"), schedule, x_T, steps)
    assert (out - x_init).abs().mean() < 0.5 * (from_noise - x_init).abs().mean()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sdedit_start_keeps_known_frames(schedule, name):
    x_known = torch.rand(2, 3, 5, 4, 4) * 2 - 1  # (B, C, F, H, W)
    mask = torch.zeros(1, 1, 5, 1, 1)
    mask[:, :, [0, 4]] = 1
    out = run(name, gaussian_model(schedule, "eps", mu=0.0), schedule, x_known.shape, 6,
              generator=torch.Generator().manual_seed(0), x_known=x_known, mask=mask,
              x_init=torch.zeros_like(x_known), strength=0.5)
    assert torch.equal(out[:, :, [0, 4]], x_known[:, :, [0, 4]])
    with pytest.raises(ValueError, match="x_init"):
        run(name, gaussian_model(schedule, "eps"), schedule, (2, 4), 4, strength=0.5)


def test_denoised_fn_clamps_the_estimate(schedule):
    clamp = lambda x0, t: x0.clamp(-1, 1)
    for name in SAMPLERS:
        out = run(name, gaussian_model(schedule, "x0"), schedule, (200, 4), 10, prediction="x0",
                  generator=torch.Generator().manual_seed(0), denoised_fn=clamp)
        assert out.max().item() <= 1.0 + 1e-6


def test_mask_needs_known_values(schedule):
    with pytest.raises(ValueError, match="x_known and mask"):
        Denoiser(gaussian_model(schedule, "eps"), schedule, mask=torch.ones(2, 4))


def test_timestep_sequence():
    assert timestep_sequence(1000, 1000) == list(range(999, -1, -1))
    assert timestep_sequence(1000, 4) == [999, 749, 499, 249]
    assert timestep_sequence(10, 1) == [9]
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(10, 11)
    assert timestep_sequence(1000, 4, strength=0.5) == [499, 374, 249, 124]
    assert timestep_sequence(1000, 1000, strength=1.0) == timestep_sequence(1000, 1000)
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(1000, 11, strength=0.01)
    with pytest.raises(ValueError, match="strength"):
        timestep_sequence(1000, 4, strength=0.0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_dispatches_on_the_config(schedule, name):
    model = gaussian_model(schedule, "v")
    cfg = SamplerConfig(name=name, steps=6, eta=0.5)
    generator = torch.Generator().manual_seed(0)
    denoiser = Denoiser(model, schedule, "v")
    x, ts = start_state(denoiser, (16, 4), 6, generator=generator)
    direct = SAMPLERS[name](denoiser, x, ts, {}, noise_sampler=default_noise_sampler(x, generator),
                            **({"eta": 0.5} if name == "ddim" else {}))
    via = sample(model, schedule, cfg, (16, 4), {}, "v", torch.Generator().manual_seed(0))
    assert torch.equal(direct, via)


def test_sample_with_guidance(schedule):
    """Guidance scale w on two Gaussians (cond mean 1.5, uncond mean 0) moves the x0 estimate to
    u + w (c - u); at the end of sampling the mean sits beyond the conditional one."""
    model = gaussian_model(schedule, "x0")
    cond = {"mu": torch.full((N, 1), MU)}
    with pytest.raises(ValueError, match="uncond_kwargs"):
        sample(model, schedule, SamplerConfig(steps=10, guidance_scale=2.0), (N, D), cond, "x0")
    uncond = null_condition(cond)
    plain = sample(model, schedule, SamplerConfig(steps=10), (N, D), cond, "x0",
                   torch.Generator().manual_seed(0), uncond_kwargs=uncond)
    guided = sample(model, schedule, SamplerConfig(steps=10, guidance_scale=2.0), (N, D), cond, "x0",
                    torch.Generator().manual_seed(0), uncond_kwargs=uncond)
    assert plain.mean().item() == pytest.approx(MU, abs=0.05)
    assert guided.mean().item() > MU + 0.5
