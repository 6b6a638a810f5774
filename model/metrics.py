"""The paper's video metrics: FVD, FID, IS and CLIPSIM, on swappable feature extractors.

Frechet distances are computed in float64 numpy. The matrix square root goes through symmetric
eigendecompositions, tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), which is exact for PSD covariances and
needs no scipy.

Pixels, everywhere here and in `model.feature_extractors`: videos are (B, F, H, W, 3) and images
(B, H, W, 3), uint8 in [0, 255] or float in [0, 1] (what decord decodes and what the cascade writes after
clamping); `unit_pixels` brings them to float [0, 1]. FVD and FID take any `VideoFeatureExtractor` /
`ImageFeatureExtractor`; the networks (I3D, Inception, and small built-in ones that need no downloaded
weights) are in `model.feature_extractors`.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

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


class RunningStats:
    """Mean and covariance of features seen batch by batch (float64 sums): the Frechet statistics of a
    set too large to hold, e.g. every frame of every MSR-VTT sample for frame FID."""

    def __init__(self, dim: int) -> None:
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, features: Array) -> None:
        x = _float64(features)
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), equal to `feature_statistics` of all the rows seen."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows, got {self.n}")
        mean = self.sum / self.n
        return mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


def fid_of_stats(real: RunningStats, fake: RunningStats) -> float:
    """`fid` of two feature sets given their `RunningStats`."""
    return frechet_distance(*real.statistics(), *fake.statistics())


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

def unit_pixels(x: torch.Tensor, channels_last_ndim: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1], channels last -> float [0, 1], same layout."""
    if x.ndim != channels_last_ndim or x.shape[-1] != 3:
        kind = "videos (B, F, H, W, 3)" if channels_last_ndim == 5 else "images (B, H, W, 3)"
        raise ValueError(f"expected {kind}, got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _as_tensor(x: Array) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


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
        frames = unit_pixels(_as_tensor(video)[None], 5)[0].permute(0, 3, 1, 2)  # (F, 3, H, W)
        sims.append((encode_images(clip_model, frames) @ t).mean())
    return torch.stack(sims).float().cpu()


def clipsim(clip_model: nn.Module, tokenizer: Callable, videos: Array | Sequence[Array],
            prompts: Sequence[str], scale: float = 1.0) -> float:
    """CLIPSIM (Wu et al. 2021, as Make-A-Video's Table 1 reports it: a raw cosine such as 0.3049): the
    mean over videos of `clip_similarities`. `scale=100` gives the x100 "CLIP score" convention."""
    return float(clip_similarities(clip_model, tokenizer, videos, prompts).mean()) * scale
