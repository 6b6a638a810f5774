"""From the image model D to the video models: inflation (D -> Dt) and interpolation (Dt -> F).

Both keep the network's function: inflation adds temporal layers that start as the identity and an fps
embedding that starts at zero; interpolation adds input channels (masked RGB + mask) whose first-conv
weights are zero. Training inflates from saved checkpoints, so everything works from a state_dict + config.
"""
from __future__ import annotations

import torch

from model.config import UNetConfig
from model.unet import UNet

# Fields a target config may change; every other field must match the source to reuse its weights.
_MAY_CHANGE = {"temporal", "fps_cond", "extra_in_channels", "dropout", "grad_checkpointing"}
# Parameters a target may add: temporal layers and the fps embedding (they start as the identity / zero).
_NEW_PREFIXES = ("fps_embed.",)
_NEW_PARTS = (".temporal.",)


def _check_compatible(src: UNetConfig, dst: UNetConfig) -> None:
    src_d, dst_d = src.model_dump(), dst.model_dump()
    changed = sorted(k for k in src_d if src_d[k] != dst_d[k] and k not in _MAY_CHANGE)
    if changed:
        raise ValueError(f"cannot expand a net whose config differs in {changed}")
    if src.temporal and not dst.temporal:
        raise ValueError("cannot drop temporal layers")
    if dst.extra_in_channels < src.extra_in_channels:
        raise ValueError(f"cannot shrink extra_in_channels {src.extra_in_channels} -> {dst.extra_in_channels}")


def is_added(key: str) -> bool:
    """Whether a parameter name is one inflation adds (a temporal layer's or the fps embedding's)."""
    return key.startswith(_NEW_PREFIXES) or any(part in key for part in _NEW_PARTS)


def _widen_first_conv(weight: torch.Tensor, src: UNetConfig, dst: UNetConfig) -> torch.Tensor:
    """Insert zero input columns for the new extra channels, between x's channels and the low-res ones.
    weight: (C_out, C_in_src, k, k) -> (C_out, C_in_dst, k, k)."""
    add = dst.extra_in_channels - src.extra_in_channels
    if add == 0:
        return weight
    split = src.in_channels + src.extra_in_channels
    zeros = weight.new_zeros(weight.shape[0], add, *weight.shape[2:])
    return torch.cat([weight[:, :split], zeros, weight[:, split:]], dim=1)


def expand_state_dict(state_dict: dict[str, torch.Tensor], src: UNetConfig, dst: UNetConfig) -> UNet:
    """Build a UNet(dst) that computes what UNet(src) with `state_dict` computes: new temporal layers at
    the identity, a new fps embedding at zero, new extra input channels with zero weights."""
    _check_compatible(src, dst)
    net = UNet(dst)
    weights = dict(state_dict)
    key = "conv_in.spatial.weight"
    if key not in weights:
        raise ValueError(f"state_dict has no {key!r}: not a UNet state_dict")
    weights[key] = _widen_first_conv(weights[key], src, dst)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"state_dict has keys the target net lacks: {unexpected[:5]}")
    not_new = [k for k in missing if not is_added(k)]
    if not_new:
        raise ValueError(f"state_dict lacks weights the target net needs: {not_new[:5]}")
    return net


def _like(net: UNet, source: UNet) -> UNet:
    param = next(source.parameters())
    return net.to(device=param.device, dtype=param.dtype).train(source.training)


def inflate_decoder(decoder: UNet) -> UNet:
    """D -> Dt: the same 2D weights in a temporal net whose temporal layers are at the identity."""
    target = decoder.cfg.model_copy(update={"temporal": True})
    return _like(expand_state_dict(decoder.state_dict(), decoder.cfg, target), decoder)


def to_interpolation(temporal_net: UNet, extra_in_channels: int = 4) -> UNet:
    """Dt -> F: 4 more input channels (masked RGB + binary mask) with zero first-conv weights, so F computes
    Dt's function whatever those channels hold, until fine-tuning teaches it to use them."""
    if not temporal_net.cfg.temporal:
        raise ValueError("to_interpolation takes the temporal net Dt; inflate the decoder first")
    target = temporal_net.cfg.model_copy(update={"extra_in_channels": extra_in_channels})
    return _like(expand_state_dict(temporal_net.state_dict(), temporal_net.cfg, target), temporal_net)


def inflate_state_dict(state_dict: dict[str, torch.Tensor], cfg: UNetConfig,
                       target: UNetConfig | None = None) -> UNet:
    """Inflate from a saved checkpoint: `cfg` is the config it was saved with; `target` defaults to
    `cfg` with temporal=True (D -> Dt); pass the interpolation config to go Dt -> F."""
    return expand_state_dict(state_dict, cfg, target or cfg.model_copy(update={"temporal": True}))
