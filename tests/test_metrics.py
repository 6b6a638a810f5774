"""The paper's metrics: Frechet distance against closed forms, FID, IS on known distributions, FVD with the
built-in extractor, CLIPSIM with a tiny CLIP trained for a few steps, local-file loaders of I3D/Inception."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import save_weights
from model.clip import build_clip, contrastive_step, tokenize
from model.config import ClipConfig
from model.feature_extractors import (ClipFrameExtractor, I3DExtractor, InceptionExtractor, InceptionI3d,
                                      RandomVideoExtractor)
from model.metrics import (clip_similarities, clipsim, extract_features, feature_statistics, fid, frechet_distance, fvd,
                           inception_score)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_scaled_full_covariance_is_the_closed_form():
    # s2 = c^2 s1 gives sqrt(s1 s2) = c s1, so FD = (1 - c)^2 tr(s1) for equal means.
    a = np.random.default_rng(1).normal(size=(5, 5))
    s1 = a @ a.T + 0.1 * np.eye(5)
    c = 1.7
    expected = (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), c ** 2 * s1) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(torch.zeros(5), torch.from_numpy(s1), np.zeros(5), s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_is_zero_for_identical_sets_and_grows_with_a_mean_shift():
    x = np.random.default_rng(2).normal(size=(200, 8))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    distances = [fid(x, x + shift) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances)
    assert distances[-1] == pytest.approx(8 * 2.0 ** 2, rel=1e-6)  # a pure shift adds |shift|^2 per dimension
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_inception_score_on_known_distributions():
    n = 10
    confident_uniform = np.eye(n)[np.arange(200) % n]
    mean, std = inception_score(confident_uniform, splits=4)
    assert mean == pytest.approx(n, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    identical = np.tile(np.random.default_rng(3).dirichlet(np.ones(n)), (100, 1))
    assert inception_score(identical, splits=2)[0] == pytest.approx(1.0, rel=1e-9)
    logits = np.random.default_rng(4).normal(size=(60, n)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert inception_score(logits, splits=3)[0] == pytest.approx(inception_score(probs, splits=3)[0], rel=1e-9)
    assert 1.0 < inception_score(logits, splits=3)[0] < n


def _moving_squares(n: int, seed: int, frames: int = 8, side: int = 32) -> np.ndarray:
    """(n, F, side, side, 3) uint8: a white square drifting from a random place at a random velocity."""
    rng = np.random.default_rng(seed)
    videos = np.zeros((n, frames, side, side, 3), np.uint8)
    for i in range(n):
        x, y = rng.uniform(0, side - 8, 2)
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 2.5)
        vx, vy = speed * np.cos(angle), speed * np.sin(angle)
        for f in range(frames):
            cx, cy = int(np.clip(x + vx * f, 0, side - 8)), int(np.clip(y + vy * f, 0, side - 8))
            videos[i, f, cy:cy + 8, cx:cx + 8] = 255
    return videos


def test_fvd_with_the_tiny_extractor_is_zero_for_the_same_videos_and_larger_for_broken_ones():
    extractor = RandomVideoExtractor(feature_dim=16, seed=0)
    real = _moving_squares(24, seed=0)
    other = _moving_squares(24, seed=1)
    rng = np.random.default_rng(5)
    shuffled = np.stack([v[rng.permutation(len(v))] for v in real])
    noised = np.clip(real.astype(np.int16) + rng.integers(-60, 61, real.shape), 0, 255).astype(np.uint8)
    assert fvd(real, real, extractor) == pytest.approx(0.0, abs=1e-6)
    baseline = fvd(real, other, extractor)  # the same distribution, other samples
    assert fvd(real, shuffled, extractor) > 2 * baseline
    assert fvd(real, noised, extractor) > 2 * baseline
    # Seeded: a second extractor with the same seed gives the same features, from a list as from an array.
    again = extract_features(RandomVideoExtractor(feature_dim=16, seed=0), list(real[:3]), batch_size=2)
    assert torch.allclose(again, extract_features(extractor, real[:3]), atol=1e-6)


TINY_CLIP = ClipConfig(model_name="mav-tiny-clip", embed_dim=32, image_size=32, context_length=16)


def test_clipsim_prefers_the_matching_prompt_after_a_few_training_steps():
    torch.manual_seed(0)
    model, _, tokenizer = build_clip(TINY_CLIP)
    captions = ["a red picture", "a blue picture"]
    colours = torch.tensor([[220, 40, 40], [40, 80, 220]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(2, 3, 32, 32).repeat(4, 1, 1, 1)  # (8, 3, 32, 32)
    images = (images.float() + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 10).clamp(0, 255)
    tokens = tokenize(model, tokenizer, captions * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        contrastive_step(model, images.to(torch.uint8), tokens, opt)
    model.eval()
    videos = colours[:, None, None, None, :].expand(2, 4, 24, 24, 3)  # (2, F, H, W, 3)
    matching = clip_similarities(model, tokenizer, videos, captions)
    swapped = clip_similarities(model, tokenizer, videos, captions[::-1])
    assert (matching > swapped).all()
    score = clipsim(model, tokenizer, videos, captions, scale=100.0)
    assert score == pytest.approx(100 * float(matching.mean()), rel=1e-5)
    features = ClipFrameExtractor(model)(videos)
    assert features.shape == (2, 32) and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        clip_similarities(model, tokenizer, videos, captions[:1])


def test_i3d_and_inception_loaders_name_an_absent_file(tmp_path):
    missing = tmp_path / "nowhere" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        I3DExtractor(missing)
    with pytest.raises(FileNotFoundError, match="pt_inception.safetensors"):
        InceptionExtractor(tmp_path / "pt_inception.safetensors")


def test_i3d_state_dict_loads_into_the_pytorch_i3d_layout(tmp_path):
    torch.manual_seed(0)
    net = InceptionI3d()
    assert "Mixed_5c.b1b.conv3d.weight" in net.state_dict() and "logits.conv3d.bias" in net.state_dict()
    path = save_weights(net, tmp_path / "i3d.safetensors")
    extractor = I3DExtractor(path)
    assert not extractor.scripted
    for key, value in net.state_dict().items():
        assert torch.equal(extractor.net.state_dict()[key], value), key


class _FakeScriptedI3D(torch.nn.Module):
    """The StyleGAN-V TorchScript calling convention, returning the mean pixel per channel."""

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        assert rescale and resize and return_features
        return x.mean(dim=(2, 3, 4))


def test_i3d_torchscript_is_called_with_the_fvd_release_convention(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeScriptedI3D()), str(path))
    extractor = I3DExtractor(path)
    assert extractor.scripted
    videos = torch.full((2, 3, 8, 8, 3), 51, dtype=torch.uint8)
    assert torch.allclose(extractor(videos), torch.full((2, 3), 51.0))  # uint8 values reach it in [0, 255]


def test_inception_weights_from_a_local_safetensors_give_2048_features(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    path = save_weights(net, tmp_path / "inception.safetensors")
    extractor = InceptionExtractor(path)
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = extractor(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert extractor.logits(images).shape == (2, 1000)
