"""The paper's defining property: a freshly inflated Dt on F identical frames returns, frame for frame, what
D returns on that frame; F with all-known extra channels returns what Dt returns. And the temporal layers
are not hard-wired to the identity: perturbed, they mix frames."""
from __future__ import annotations

import pytest
import torch

from model.config import cascade_preset
from model.frames import interpolation_channels
from model.inflate import expand_state_dict, inflate_decoder, inflate_state_dict, to_interpolation
from model.layers import AttentionBlock, PseudoConv3d
from model.networks import build_network
from model.unet import UNet

TINY = cascade_preset("tiny")
B, FRAMES, SIZE = 2, 3, 16
ATOL = 1e-5


@pytest.fixture(scope="module")
def nets() -> dict[str, UNet]:
    torch.manual_seed(0)
    decoder = build_network("decoder", TINY).eval()
    temporal = inflate_decoder(decoder)
    return {"decoder": decoder, "temporal": temporal, "interpolation": to_interpolation(temporal)}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, SIZE, SIZE, generator=gen)
    cond = torch.randn(B, TINY.decoder.net.cond_dim, generator=gen)
    return image, torch.tensor([17.0, 640.0]), cond, torch.tensor([3.0, 25.0])


def _repeat(image: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()  # (B, C, F, H, W)


@pytest.mark.parametrize("with_fps", [False, True])
def test_inflated_equals_decoder_frame_by_frame(nets: dict[str, UNet], with_fps: bool) -> None:
    image, t, cond, fps = _batch()
    with torch.no_grad():
        frame = nets["decoder"](image, t, cond)
        video = nets["temporal"](_repeat(image), t, cond, fps=fps if with_fps else None)
    assert frame.std() > 0.05  # a real function, not a zero output
    for f in range(FRAMES):
        torch.testing.assert_close(video[:, :, f], frame, atol=ATOL, rtol=0)


def test_inflated_with_distinct_frames_is_per_frame_decoder(nets: dict[str, UNet]) -> None:
    """At init the temporal layers are the identity for any video, not only for repeated frames."""
    gen = torch.Generator().manual_seed(5)
    video = torch.randn(B, 3, FRAMES, SIZE, SIZE, generator=gen)
    _, t, cond, fps = _batch()
    with torch.no_grad():
        out = nets["temporal"](video, t, cond, fps=fps)
        for f in range(FRAMES):
            torch.testing.assert_close(out[:, :, f], nets["decoder"](video[:, :, f], t, cond), atol=ATOL, rtol=0)


def test_interpolation_equals_temporal(nets: dict[str, UNet]) -> None:
    image, t, cond, fps = _batch(1)
    video = _repeat(image)
    extra = interpolation_channels(video, torch.ones(FRAMES, dtype=torch.bool))  # masked RGB = frames, all known
    with torch.no_grad():
        want = nets["temporal"](video, t, cond, fps=fps)
        got = nets["interpolation"](torch.cat([video, extra], dim=1), t, cond, fps=fps)
        frame = nets["decoder"](image, t, cond)
    assert nets["interpolation"].cfg.extra_in_channels == 4
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[:, :, 0], frame, atol=ATOL, rtol=0)


def test_inflate_from_state_dict(nets: dict[str, UNet]) -> None:
    """Training inflates from a saved checkpoint: state_dict + the config it was saved with."""
    image, t, cond, fps = _batch(2)
    decoder_sd = nets["decoder"].state_dict()
    temporal = inflate_state_dict(decoder_sd, TINY.decoder.net).eval()
    interp = inflate_state_dict(decoder_sd, TINY.decoder.net, TINY.interpolation.net).eval()
    video = _repeat(image)
    extra = interpolation_channels(video, torch.ones(FRAMES, dtype=torch.bool))
    with torch.no_grad():
        frame = nets["decoder"](image, t, cond)
        out_t = temporal(video, t, cond, fps=fps)
        out_i = interp(torch.cat([video, extra], dim=1), t, cond, fps=fps)
    torch.testing.assert_close(out_t[:, :, -1], frame, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_i[:, :, -1], frame, atol=ATOL, rtol=0)


def test_super_resolution_inflates_with_lowres() -> None:
    torch.manual_seed(0)
    sr2d = build_network("sr_high", TINY).eval()
    sr3d = inflate_state_dict(sr2d.state_dict(), sr2d.cfg).eval()
    gen = torch.Generator().manual_seed(3)
    image, low = torch.randn(B, 3, 32, 32, generator=gen), torch.randn(B, 3, 16, 16, generator=gen)
    t, level = torch.tensor([5.0, 9.0]), torch.tensor([150, 0])
    with torch.no_grad():
        frame = sr2d(image, t, lowres=low, noise_level=level)
        video = sr3d(_repeat(image), t, lowres=_repeat(low), noise_level=level)
    for f in range(FRAMES):
        torch.testing.assert_close(video[:, :, f], frame, atol=ATOL, rtol=0)


def _perturb_temporal(net: UNet, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".temporal." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
                touched += 1
    return touched


def test_perturbed_temporal_layers_mix_frames(nets: dict[str, UNet]) -> None:
    """Changing frame 1 changes frame 0's output only through temporal layers."""
    temporal = inflate_decoder(nets["decoder"]).eval()
    gen = torch.Generator().manual_seed(9)
    video = torch.randn(1, 3, FRAMES, SIZE, SIZE, generator=gen)
    edited = video.clone()
    edited[:, :, 1] += 1.0
    t = torch.tensor([100.0])
    with torch.no_grad():
        at_init = (temporal(video, t) - temporal(edited, t))[:, :, 0].abs().max()
        assert _perturb_temporal(temporal, 11) > 0
        perturbed = (temporal(video, t) - temporal(edited, t))[:, :, 0].abs().max()
        skipped = (temporal(video, t, enable_time=False) - temporal(edited, t, enable_time=False))[:, :, 0].abs().max()
    assert at_init < ATOL
    assert perturbed > 1e-2
    assert skipped < ATOL  # enable_time=False skips every temporal layer


def test_temporal_layers_each_mix_and_order_frames() -> None:
    """Both temporal layers, perturbed, mix frames; the frame encoding tells identical frames apart."""
    torch.manual_seed(0)
    conv = PseudoConv3d(8, 8, temporal=True)
    attn = AttentionBlock(8, 4, context_dim=6, temporal=True)
    same = _repeat(torch.randn(1, 8, 4, 4), 4)
    ctx = torch.randn(1, 2, 6)
    with torch.no_grad():
        assert torch.allclose(conv(same)[:, :, 0], conv(same)[:, :, 2])
        torch.nn.init.normal_(conv.temporal.conv.weight, std=0.3)
        torch.nn.init.normal_(attn.temporal.attn.to_out.weight, std=0.3)
        mixed = conv(same)
        attended = attn(same, ctx)
    # zero padding at the ends of the temporal conv and the frame encoding of the attention make frames differ
    assert not torch.allclose(mixed[:, :, 0], mixed[:, :, 1], atol=1e-4)
    assert not torch.allclose(attended[:, :, 1], attended[:, :, 2], atol=1e-4)


def test_incompatible_configs_are_refused(nets: dict[str, UNet]) -> None:
    decoder_cfg = TINY.decoder.net
    sd = nets["decoder"].state_dict()
    with pytest.raises(ValueError, match="base_channels"):
        expand_state_dict(sd, decoder_cfg, decoder_cfg.model_copy(update={"base_channels": 32, "temporal": True}))
    with pytest.raises(ValueError, match="temporal"):
        expand_state_dict(nets["temporal"].state_dict(), TINY.temporal.net, decoder_cfg)
    with pytest.raises(ValueError, match="inflate the decoder first"):
        to_interpolation(nets["decoder"])
    with pytest.raises(ValueError, match="lacks"):
        expand_state_dict({k: v for k, v in sd.items() if "mid" not in k}, decoder_cfg, TINY.temporal.net)


def test_inflation_keeps_a_trained_cond_map() -> None:
    """The embedding's spatial map is a 2D weight like any other: Dt applies it to every frame as D does."""
    cfg = TINY.model_copy(update={"decoder": TINY.decoder.model_copy(
        update={"net": TINY.decoder.net.model_copy(update={"cond_map": 4})})})
    torch.manual_seed(0)
    decoder = build_network("decoder", cfg).eval()
    torch.nn.init.normal_(decoder.cond_map.weight, std=0.5)
    temporal = inflate_decoder(decoder)
    video = torch.randn(B, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    _, t, cond, fps = _batch()
    with torch.no_grad():
        out = temporal(video, t, cond, fps=fps)
        for f in range(FRAMES):
            torch.testing.assert_close(out[:, :, f], decoder(video[:, :, f], t, cond), atol=ATOL, rtol=0)
