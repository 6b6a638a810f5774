"""The pseudo-3D U-Net of every image and video stage: shapes, conditioning, determinism, one training
step, gradient checkpointing, per-frame SR, and the paper preset's arithmetic (checked, never run)."""
from __future__ import annotations

import pytest
import torch

from model.config import CascadeConfig, cascade_preset
from model.layers import PseudoConv3d, fold_frames, group_count, unfold_frames
from model.networks import STAGES, build_network, count_parameters
from model.unet import UNet, apply_per_frame

TINY = cascade_preset("tiny")
B = 2


def _inputs(stage: str, cfg: CascadeConfig, video: bool, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A batch for `stage` at its own resolution; SR gets a low-res input at half size."""
    net_cfg = getattr(cfg, stage).net
    shape = cfg.shape
    size = {"sr_low": shape.sr_low_size, "sr_high": shape.sr_high_size}.get(stage, shape.base_size)
    channels = net_cfg.in_channels + net_cfg.extra_in_channels
    frames = (shape.frames,) if video else ()
    x = torch.randn(B, channels, *frames, size, size, generator=gen)
    kw: dict = {"t": torch.tensor([3.0, 700.0]), "cond_emb": torch.randn(B, net_cfg.cond_dim, generator=gen)}
    if net_cfg.lowres_cond:
        kw["lowres"] = torch.randn(B, net_cfg.in_channels, *frames, size // 2, size // 2, generator=gen)
        kw["noise_level"] = torch.tensor([0, 100])
    if video and net_cfg.temporal and net_cfg.fps_cond:
        kw["fps"] = torch.tensor([4.0, 24.0])
    return x, kw


def _as_if_trained(net: UNet) -> UNet:
    """An SR net starts at zero output; give its last conv ordinary random weights so inputs show."""
    net.conv_out.spatial.reset_parameters()
    return net


UNET_CASES = [("decoder", False), ("temporal", True), ("temporal", False), ("interpolation", True),
              ("sr_low", True), ("sr_low", False), ("sr_high", False)]


@pytest.mark.parametrize("stage,video", UNET_CASES)
def test_shapes(stage: str, video: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    net = build_network(stage, TINY).eval()
    x, kw = _inputs(stage, TINY, video, gen)
    with torch.no_grad():
        out = net(x, **kw)
    expected = (B, net.cfg.out_channels, *x.shape[2:])
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_every_stage_builds_and_counts() -> None:
    counts = {stage: count_parameters(build_network(stage, TINY)) for stage in STAGES}
    assert all(n > 0 for n in counts.values())
    assert counts["temporal"] > counts["decoder"]  # temporal convs and attention added
    with pytest.raises(ValueError, match="unknown stage"):
        build_network("vae", TINY)


def test_paper_arithmetic() -> None:
    """16x64x64 -> 76 frames -> 256 -> 768, from the preset and from the nets' configs (not run)."""
    paper = cascade_preset("paper")
    shape = paper.shape
    assert (shape.frames, shape.base_size) == (16, 64)
    assert shape.interpolated_frames == (16 - 1) * 5 + 1 == 76
    assert (shape.sr_low_size, shape.sr_high_size) == (256, 768)
    assert paper.interpolation.net.extra_in_channels == 4 and paper.interpolation.net.temporal
    assert paper.sr_low.net.temporal and paper.sr_low.net.lowres_cond
    assert not paper.sr_high.net.temporal and paper.sr_high.net.lowres_cond
    assert not paper.decoder.net.temporal and paper.temporal.net.temporal
    for stage, size in [("decoder", 64), ("sr_low", 256), ("sr_high", 768)]:
        net_cfg = getattr(paper, stage).net
        factor = 2 ** (len(net_cfg.channel_mult) - 1)
        assert size % factor == 0  # every size runs through that U-Net's downsampling
        assert size // factor >= 8
        widths = [net_cfg.base_channels * m for m in net_cfg.channel_mult]
        assert all(w % net_cfg.head_dim == 0 for i, w in enumerate(widths) if i in net_cfg.attn_levels)
    assert shape.sr_low_size // shape.base_size == 4 and shape.sr_high_size // shape.sr_low_size == 3


def test_determinism_with_seed() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        net = build_network("temporal", TINY).eval()
        x, kw = _inputs("temporal", TINY, True, torch.Generator().manual_seed(7))
        with torch.no_grad():
            outs.append(net(x, **kw))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("stage", ["decoder", "temporal", "interpolation", "sr_low", "sr_high"])
def test_one_adam_step_lowers_mse(stage: str) -> None:
    torch.manual_seed(0)
    net = build_network(stage, TINY).train()
    video = stage in ("temporal", "interpolation", "sr_low")
    x, kw = _inputs(stage, TINY, video, torch.Generator().manual_seed(1))
    target = torch.randn(B, net.cfg.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(net(x, **kw), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_null_condition_is_zeros_and_condition_matters() -> None:
    torch.manual_seed(0)
    net = build_network("decoder", TINY).eval()
    x = torch.randn(B, 3, 16, 16)
    t = torch.tensor([5, 5])
    with torch.no_grad():
        none = net(x, t)
        zeros = net(x, t, cond_emb=torch.zeros(B, net.cfg.cond_dim))
        cond = net(x, t, cond_emb=torch.randn(B, net.cfg.cond_dim))
        later = net(x, torch.tensor([900, 900]))
    assert torch.equal(none, zeros)
    assert not torch.allclose(none, cond, atol=1e-4)
    assert not torch.allclose(none, later, atol=1e-4)


def test_super_resolution_conditioning_matters() -> None:
    """The low-res input and its augmentation timestep both reach the output; noise_level None = 0."""
    torch.manual_seed(0)
    net = _as_if_trained(build_network("sr_high", TINY)).eval()
    gen = torch.Generator().manual_seed(8)
    x, low = torch.randn(B, 3, 32, 32, generator=gen), torch.randn(B, 3, 16, 16, generator=gen)
    t = torch.tensor([5, 5])
    with torch.no_grad():
        base = net(x, t, lowres=low)
        zero = net(x, t, lowres=low, noise_level=torch.tensor([0, 0]))
        noised = net(x, t, lowres=low, noise_level=torch.tensor([300, 300]))
        other = net(x, t, lowres=torch.randn(B, 3, 16, 16, generator=gen))
    assert torch.equal(base, zero)
    assert not torch.allclose(base, noised, atol=1e-4)
    assert not torch.allclose(base, other, atol=1e-4)


@pytest.mark.parametrize("stage,video", [("sr_low", True), ("sr_high", False), ("decoder", False)])
def test_only_super_resolution_nets_start_at_zero_output(stage: str, video: bool) -> None:
    """An SR stage's residual x0 is then zero at init: the cascade returns the bilinear upsample."""
    torch.manual_seed(0)
    net = build_network(stage, TINY).eval()
    x, kw = _inputs(stage, TINY, video, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x, **kw)
    assert bool((out == 0).all()) == net.cfg.lowres_cond


def test_integer_float_and_scalar_timesteps_agree() -> None:
    torch.manual_seed(0)
    net = build_network("decoder", TINY).eval()
    x = torch.randn(B, 3, 16, 16)
    with torch.no_grad():
        ints = net(x, torch.tensor([10, 10]))
        floats = net(x, torch.tensor([10.0, 10.0]))
        scalar = net(x, torch.tensor(10))
    assert torch.equal(ints, floats) and torch.equal(ints, scalar)


def test_grad_checkpointing_matches() -> None:
    cfg = TINY.temporal.net
    torch.manual_seed(0)
    plain = UNet(cfg).train()
    ckpt = UNet(cfg.model_copy(update={"grad_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x, kw = _inputs("temporal", TINY, True, torch.Generator().manual_seed(3))
    grads = []
    for net in (plain, ckpt):
        net(x, **kw).square().mean().backward()
        grads.append(net.conv_in.spatial.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_input_errors() -> None:
    dec = build_network("decoder", TINY)
    sr = build_network("sr_high", TINY)
    t = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="channels"):
        dec(torch.randn(B, 7, 16, 16), t)
    with pytest.raises(ValueError, match="multiples"):
        dec(torch.randn(B, 3, 15, 15), t)
    with pytest.raises(ValueError, match="fps"):
        dec(torch.randn(B, 3, 16, 16), t, fps=torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match="lowres"):
        sr(torch.randn(B, 3, 32, 32), t)
    with pytest.raises(ValueError, match="lowres"):
        dec(torch.randn(B, 3, 16, 16), t, lowres=torch.randn(B, 3, 8, 8))


def test_apply_per_frame_matches_folded_batch() -> None:
    """SR_h per frame in chunks equals one call on all frames folded into the batch."""
    torch.manual_seed(0)
    net = _as_if_trained(build_network("sr_high", TINY)).eval()
    gen = torch.Generator().manual_seed(4)
    frames = 3
    video = torch.randn(B, 3, frames, 32, 32, generator=gen)
    lowres = torch.randn(B, 3, frames, 16, 16, generator=gen)
    cond = torch.randn(B, net.cfg.cond_dim, generator=gen)
    t, level = torch.tensor([2.0, 50.0]), torch.tensor([10, 200])
    with torch.no_grad():
        chunked = apply_per_frame(net, video, 4, t=t, cond_emb=cond, lowres=lowres, noise_level=level)
        folded = net(fold_frames(video), t.repeat_interleave(frames), cond.repeat_interleave(frames, 0),
                     lowres=fold_frames(lowres), noise_level=level.repeat_interleave(frames))
    assert chunked.shape == (B, 3, frames, 32, 32)
    torch.testing.assert_close(chunked, unfold_frames(folded, frames), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="rows"):
        apply_per_frame(net, video, 2, t=torch.zeros(5), lowres=lowres)


def test_pseudo_conv_accepts_5d_and_folded() -> None:
    torch.manual_seed(0)
    conv = PseudoConv3d(4, 6, temporal=True)
    torch.nn.init.normal_(conv.temporal.conv.weight)
    x = torch.randn(2, 4, 3, 8, 8)
    torch.testing.assert_close(conv(x), unfold_frames(conv(fold_frames(x), frames=3), 3))


def test_group_norm_keeps_several_channels_per_group() -> None:
    """32 groups like ADM on wide nets; never one channel per group (an instance norm) on narrow ones."""
    assert group_count(256) == 32 and group_count(128) == 32
    assert group_count(32) == 8 and group_count(16) == 4 and group_count(8) == 2
    net = build_network("decoder", cascade_preset("toy"))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 4 for m in norms)


def test_cond_map_places_the_condition_in_space() -> None:
    """Zero at init (the net computes what it computes without the map); once trained, what the embedding
    adds differs from pixel to pixel, which scale-shift and cross-attention cannot do."""
    cfg = TINY.decoder.net.model_copy(update={"cond_map": 4})
    torch.manual_seed(0)
    plain = UNet(cfg.model_copy(update={"cond_map": 0})).eval()
    net = UNet(cfg).eval()
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["cond_map.bias", "cond_map.weight"] and not unexpected
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, 3, 16, 16, generator=gen), torch.tensor([5.0, 500.0])
    cond = torch.randn(B, cfg.cond_dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, cond), plain(x, t, cond))
        torch.nn.init.normal_(net.cond_map.weight, std=0.5)
        h = torch.zeros(B, cfg.base_channels, 16, 16)
        layout = net._layout(net._cond(B, cond, h.device, h.dtype), h, 1)  # (B, C, 16, 16)
        assert layout.shape == h.shape
        assert layout.std(dim=(-2, -1)).mean() > 0.1  # varies across the image
        assert not torch.allclose(net(x, t, cond), plain(x, t, cond))
        null = net._layout(net._cond(B, None, h.device, h.dtype), h, 1)
        assert torch.allclose(null, torch.zeros_like(null))  # zero bias: the null condition adds nothing
