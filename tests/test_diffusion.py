"""The diffusion process: schedules, forward noising, parameterisations, the loss, guidance, SR augmentation."""
from __future__ import annotations

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import (alpha_sigma, cfg_model, drop_condition, make_schedule, noise_augment, null_condition,
                             output_to_eps, output_to_x0, q_sample, randn_like, random_aug_levels,
                             residual_clamp, sample_timesteps, target_for, training_loss)

SHAPES = [(6, 8), (6, 3, 5, 5), (6, 3, 4, 5, 5)]  # embeddings, images, videos


@pytest.fixture(scope="module")
def schedule():
    return make_schedule(DiffusionConfig(timesteps=100, schedule="cosine"))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_decreases_from_one_to_zero(kind):
    sch = make_schedule(DiffusionConfig(timesteps=1000, schedule=kind))
    ab = sch.alphas_cumprod
    assert sch.timesteps == 1000 and ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1])
    assert 0.999 < ab[0] < 1 and 0 < ab[-1] < 1e-3
    assert torch.all(sch.betas <= 0.999)
    if kind == "linear":
        assert sch.betas[0].item() == pytest.approx(1e-4) and sch.betas[-1].item() == pytest.approx(0.02)


def test_cosine_matches_closed_form():
    sch = make_schedule(DiffusionConfig(timesteps=1000, schedule="cosine"))
    f = lambda t: torch.cos(torch.tensor((t / 1000 + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
    assert sch.alphas_cumprod[499].item() == pytest.approx((f(500) / f(0)).item(), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_broadcasts_per_sample_t(schedule, shape):
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0, 10, 50, 99, 99, 3])
    xt = q_sample(schedule, x0, t, noise)
    for i in range(shape[0]):
        ab = schedule.alphas_cumprod[t[i]].item()
        torch.testing.assert_close(xt[i], ab ** 0.5 * x0[i] + (1 - ab) ** 0.5 * noise[i])


def test_q_sample_marginal_variance_is_preserved(schedule):
    x0 = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    xt = q_sample(schedule, x0, torch.full((20000,), 60), torch.randn(20000, 4))
    assert xt.std().item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_parameterisations_convert_back(schedule, prediction, shape):
    x0, noise = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, 100, (shape[0],))
    a, s = alpha_sigma(schedule, t, x0)
    xt = a * x0 + s * noise
    out = target_for(prediction, x0, noise, a, s)
    torch.testing.assert_close(output_to_x0(prediction, out, xt, a, s), x0)
    torch.testing.assert_close(output_to_eps(prediction, out, xt, a, s), noise)


def test_unknown_prediction_is_refused(schedule):
    with pytest.raises(ValueError, match="unknown prediction"):
        training_loss(lambda x, t: x, schedule, torch.randn(2, 3), prediction="score")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_training_loss_is_zero_for_the_oracle(schedule, prediction):
    """A network that knows x0 outputs the exact target, so the loss vanishes; any other output does not."""
    x0, noise = torch.randn(4, 3, 2, 6, 6), torch.randn(4, 3, 2, 6, 6)

    def oracle(xt, t, shift=0.0):
        a, s = alpha_sigma(schedule, t, xt)
        return target_for(prediction, x0, (xt - a * x0) / s, a, s) + shift

    t = torch.tensor([1, 20, 70, 99])
    assert training_loss(oracle, schedule, x0, t, {}, prediction, noise=noise).item() < 1e-8
    assert training_loss(oracle, schedule, x0, t, {"shift": 0.5}, prediction, noise=noise).item() == \
        pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("share", [0.3, 0.8])
def test_mixed_frame_noise_is_unit_per_frame_and_correlated_across_frames(share):
    x = torch.empty(64, 3, 5, 16, 16)
    noise = randn_like(x, torch.Generator().manual_seed(0), frame_share=share)
    per_frame = noise.transpose(1, 2).reshape(64 * 5, -1)  # one row per frame
    assert per_frame.var(dim=1).mean().item() == pytest.approx(1.0, abs=0.02)
    a, b = noise[:, :, 1].flatten(), noise[:, :, 3].flatten()  # two frames of the same clips
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].item() == pytest.approx(share, abs=0.02)
    other = noise[torch.arange(1, 65) % 64, :, 3].flatten()  # the same frame of other clips
    assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.02
    # share 0 and images: the plain draw, so configs without the option reproduce earlier samples
    assert torch.equal(randn_like(x, torch.Generator().manual_seed(0), 0.0),
                       torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    image = torch.empty(4, 3, 8, 8)
    assert torch.equal(randn_like(image, torch.Generator().manual_seed(0), share),
                       randn_like(image, torch.Generator().manual_seed(0)))


def test_training_loss_seeded_and_trainable(schedule):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    model = lambda x, t, cond: net(torch.cat([x, t[:, None].float() / 100], dim=1)) + cond
    x0, cond = torch.randn(64, 8), torch.zeros(64, 8)
    l1 = training_loss(model, schedule, x0, None, {"cond": cond}, "v", torch.Generator().manual_seed(3))
    l2 = training_loss(model, schedule, x0, None, {"cond": cond}, "v", torch.Generator().manual_seed(3))
    assert l1.ndim == 0 and l1.item() == l2.item()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    t, noise = sample_timesteps(schedule, 64, generator=torch.Generator().manual_seed(1)), torch.randn(64, 8)
    first = training_loss(model, schedule, x0, t, {"cond": cond}, "v", noise=noise)
    for _ in range(30):
        opt.zero_grad()
        training_loss(model, schedule, x0, t, {"cond": cond}, "v", noise=noise).backward()
        opt.step()
    assert training_loss(model, schedule, x0, t, {"cond": cond}, "v", noise=noise).item() < 0.8 * first.item()


def test_drop_condition_rates_and_null():
    cond = torch.ones(1000, 8)
    assert torch.equal(drop_condition(cond, 0.0), cond)
    assert torch.equal(drop_condition(cond, 1.0), torch.zeros_like(cond))
    dropped = drop_condition(cond, 0.3, torch.Generator().manual_seed(0))
    rows = dropped.sum(dim=1)
    assert set(rows.unique().tolist()) == {0.0, 8.0}
    assert (rows == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)
    again = drop_condition(cond, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)


def test_drop_condition_shares_one_mask_across_a_mapping():
    cond = {"text_emb": torch.ones(200, 4), "text_tokens": torch.ones(200, 16, dtype=torch.long)}
    out = drop_condition(cond, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out["text_emb"][:, 0] == 0, out["text_tokens"][:, 0] == 0)
    assert out["text_tokens"].dtype == torch.long
    assert torch.equal(null_condition(cond)["text_emb"], torch.zeros(200, 4))


class CountingModel(torch.nn.Module):
    """Output depends on x, t and the condition; records the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, cond, fps=None):
        self.calls.append(x.shape[0])
        return self.lin(x) * (1 + t[:, None].float()) + cond.sum(dim=1, keepdim=True) * (fps or 1)


def test_cfg_scale_one_is_exactly_the_conditional_model():
    model, x, t = CountingModel(), torch.randn(3, 4), torch.tensor([5, 6, 7])
    cond, uncond = {"cond": torch.randn(3, 2), "fps": 8}, {"cond": torch.zeros(3, 2), "fps": 8}
    with torch.no_grad():
        assert torch.equal(cfg_model(model, 1.0, cond, uncond)(x, t), model(x, t, **cond))


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_cfg_combines_in_one_batched_forward(scale):
    model, x, t = CountingModel(), torch.randn(3, 4), torch.tensor([5, 6, 7])
    cond, uncond = {"cond": torch.randn(3, 2), "fps": 8}, {"cond": torch.zeros(3, 2), "fps": 8}
    with torch.no_grad():
        c, u = model(x, t, **cond), model(x, t, **uncond)
        model.calls.clear()
        guided = cfg_model(model, scale, cond, uncond)(x, t)
    assert model.calls == [6]
    torch.testing.assert_close(guided, u + scale * (c - u))


def test_cfg_refuses_mismatched_kwargs():
    with pytest.raises(ValueError, match="differ in keys"):
        cfg_model(CountingModel(), 2.0, {"cond": torch.ones(1, 2)}, {})
    with pytest.raises(ValueError, match="fps"):
        cfg_model(CountingModel(), 2.0, {"cond": torch.ones(1, 2), "fps": 4}, {"cond": torch.ones(1, 2), "fps": 8})


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_augment_levels(schedule, shape):
    low = torch.rand(shape)
    clean, t0 = noise_augment(low, 0.0, schedule)
    assert torch.equal(clean, low) and torch.equal(t0, torch.zeros(shape[0], dtype=torch.long))
    noised, t1 = noise_augment(low, 1.0, schedule, torch.Generator().manual_seed(0))
    assert torch.equal(t1, torch.full((shape[0],), 99)) and noised.shape == low.shape
    assert (noised - low).abs().mean() > 0.5
    levels = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.0, 1.0])
    mixed, t_aug = noise_augment(low, levels, schedule, torch.Generator().manual_seed(0))
    assert t_aug.tolist() == [0, 10, 20, 50, 0, 99]
    assert torch.equal(mixed[0], low[0]) and torch.equal(mixed[4], low[4]) and not torch.equal(mixed[1], low[1])


def test_noise_augment_is_seeded_and_checks_shape(schedule):
    low = torch.rand(4, 3, 8, 8)
    a, _ = noise_augment(low, 0.2, schedule, torch.Generator().manual_seed(5))
    b, _ = noise_augment(low, 0.2, schedule, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="level"):
        noise_augment(low, torch.tensor([0.1, 0.2]), schedule)
    levels = random_aug_levels(1000, 0.2, generator=torch.Generator().manual_seed(0))
    assert levels.min() >= 0 and levels.max() <= 0.2 and levels.mean().item() == pytest.approx(0.1, abs=0.01)


def test_residual_clamp_keeps_base_plus_estimate_in_pixel_range():
    gen = torch.Generator().manual_seed(2)
    base = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    x0 = torch.randn(2, 3, 8, 8, generator=gen)
    clipped = residual_clamp(base)(x0, torch.zeros(2))
    assert (base + clipped).abs().max() <= 1 + 1e-6
    inside = (base + x0).abs() <= 1
    torch.testing.assert_close(clipped[inside], x0[inside])
    assert not inside.all()

