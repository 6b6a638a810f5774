"""C3D (Tran et al. 2015), the classifier behind the Inception Score every UCF-101 text/class-to-video paper
reports (TGAN, MoCoGAN, StyleGAN-V, Make-A-Video's Table 2): a UCF-101 fine-tuned C3D's softmax over the
101 classes, on 16-frame clips.

Weights come from a local file only: a state dict (.safetensors, or .pt/.pth read with weights_only) with
the layer names of the common PyTorch port (conv1, conv2, conv3a ... conv5b, fc6, fc7, fc8), or a
TorchScript archive called on the prepared clip. Widths are read off the state dict, so a small stand-in
with the same layout loads through the same path.

Preprocessing, as the TGAN/StyleGAN-V IS code does: frames in [0, 255], resized to 128 x 171 (H x W),
centre-cropped to 112 x 112, minus the clip mean (a `mean` tensor in the state dict, broadcast to
(3, 16, 112, 112); the Sports-1M per-channel mean otherwise), channels in the file's order (RGB unless the
state dict holds `bgr` = 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import load_weights
from model.feature_extractors import checked_path, is_torchscript
from model.metrics import unit_pixels

C3D_FRAMES = 16
C3D_RESIZE = (128, 171)
C3D_CROP = 112
SPORTS1M_MEAN = (90.25, 97.66, 101.41)  # per channel, [0, 255]: the mean of C3D's Sports-1M training clips
_CONVS = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")


class C3D(nn.Module):
    """(B, 3, 16, 112, 112) prepared clips -> logits (B, classes). `widths`: output channels of conv1,
    conv2, conv3, conv4, conv5 (64, 128, 256, 512, 512 in the published network); `hidden`: fc6/fc7 width."""

    def __init__(self, num_classes: int = 101, widths: Sequence[int] = (64, 128, 256, 512, 512),
                 hidden: int = 4096) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        chans = {"conv1": (3, w1), "conv2": (w1, w2), "conv3a": (w2, w3), "conv3b": (w3, w3),
                 "conv4a": (w3, w4), "conv4b": (w4, w4), "conv5a": (w4, w5), "conv5b": (w5, w5)}
        for name in _CONVS:
            self.add_module(name, nn.Conv3d(*chans[name], kernel_size=3, padding=1))
        self.fc6 = nn.Linear(w5 * 4 * 4, hidden)  # pool5 leaves (1, 4, 4) of a 16 x 112 x 112 clip
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.conv1(x)), (1, 2, 2), (1, 2, 2))
        x = F.max_pool3d(F.relu(self.conv2(x)), 2, 2)
        x = F.max_pool3d(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2, 2)
        x = F.max_pool3d(F.relu(self.conv4b(F.relu(self.conv4a(x)))), 2, 2)
        x = F.max_pool3d(F.relu(self.conv5b(F.relu(self.conv5a(x)))), 2, 2, padding=(0, 1, 1))
        x = F.relu(self.fc6(x.flatten(1)))
        return self.fc8(F.relu(self.fc7(x)))


def c3d_input(videos: torch.Tensor, mean: torch.Tensor, bgr: bool = False) -> torch.Tensor:
    """(B, F, H, W, 3) pixels (see `model.metrics`) -> (B, 3, 16, 112, 112) float, mean subtracted, [0, 255]
    scale. Clips longer than 16 frames give their first 16; shorter ones repeat their last frame."""
    x = unit_pixels(videos, 5) * 255  # (B, F, H, W, 3)
    if x.shape[1] < C3D_FRAMES:
        x = torch.cat([x, x[:, -1:].expand(-1, C3D_FRAMES - x.shape[1], -1, -1, -1)], dim=1)
    x = x[:, :C3D_FRAMES]
    if bgr:
        x = x.flip(-1)
    b = x.shape[0]
    frames = x.permute(0, 1, 4, 2, 3).reshape(b * C3D_FRAMES, 3, *x.shape[2:4])
    frames = F.interpolate(frames, size=C3D_RESIZE, mode="bilinear", align_corners=False, antialias=True)
    top, left = (C3D_RESIZE[0] - C3D_CROP) // 2, (C3D_RESIZE[1] - C3D_CROP) // 2
    frames = frames[:, :, top:top + C3D_CROP, left:left + C3D_CROP]
    clips = frames.reshape(b, C3D_FRAMES, 3, C3D_CROP, C3D_CROP).permute(0, 2, 1, 3, 4)
    return clips - mean.to(clips)


class C3DClassifier(nn.Module):
    """The IS classifier from a local file (see the module doc): videos -> class logits (B, classes)."""

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__()
        path = checked_path(weights_path, "C3D")
        self.device = torch.device(device)
        self.bgr = False
        mean = torch.tensor(SPORTS1M_MEAN).view(3, 1, 1, 1)
        if is_torchscript(path):
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            state, _ = load_weights(path)
            mean = state.pop("mean", mean).float()
            self.bgr = bool(state.pop("bgr", torch.zeros(())).item())
            widths = [state[f"{name}.weight"].shape[0] for name in ("conv1", "conv2", "conv3a", "conv4a", "conv5a")]
            net = C3D(state["fc8.weight"].shape[0], widths, state["fc6.weight"].shape[0])
            net.load_state_dict(state)
            self.net = net.to(self.device).eval()
        self.register_buffer("mean", mean.expand(3, C3D_FRAMES, C3D_CROP, C3D_CROP).clone()
                             if mean.ndim == 4 and mean.shape[1:] == (1, 1, 1) else _cropped_mean(mean))

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.net(c3d_input(videos, self.mean, self.bgr).to(self.device)).float()


def _cropped_mean(mean: torch.Tensor) -> torch.Tensor:
    """A full mean clip (3, 16, 128, 171), as TGAN's mean file holds, centre-cropped like the frames."""
    if mean.ndim != 4 or mean.shape[0] != 3:
        raise ValueError(f"a C3D mean must be (3, 1, 1, 1) or (3, 16, H, W), got {tuple(mean.shape)}")
    h, w = mean.shape[2:]
    top, left = (h - C3D_CROP) // 2, (w - C3D_CROP) // 2
    return mean[:, :C3D_FRAMES, top:top + C3D_CROP, left:left + C3D_CROP].clone()
