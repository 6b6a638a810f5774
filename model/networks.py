"""One constructor for every network of the cascade, by stage name.

This builds fresh networks from the config. temporal and interpolation are trained from an inflated
decoder: see model/inflate.py (`inflate_decoder`, `to_interpolation`, `inflate_state_dict`).
"""
from __future__ import annotations

from torch import nn

from model.config import CascadeConfig
from model.prior import DiffusionPrior
from model.unet import UNet

STAGES = ("prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")


def build_network(stage: str, cascade_cfg: CascadeConfig) -> nn.Module:
    """-> DiffusionPrior for "prior", UNet for the image and video stages."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    if stage == "prior":
        return DiffusionPrior(cascade_cfg.prior.net)
    return UNet(getattr(cascade_cfg, stage).net)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
