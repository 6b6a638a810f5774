"""Pixel filters: LAION-style NSFW and watermark heads over CLIP image embeddings.

The metadata filter (pipelines/images/filters.py) trusts LAION's `punsafe` and `pwatermark` columns,
which may be null or wrong. These heads look at the downloaded pixels instead, through the CLIP image
embedding computed anyway for the prior and the decoder, so the extra cost is one small MLP per sample.
LAION's released detectors are of this kind: a few dense layers (or one linear layer) and a sigmoid
over an L2-normalised CLIP embedding.

Weights come only from local files (safetensors, or a .pt/.pth state dict read with
`torch.load(weights_only=True)` via `model.checkpoint.load_weights`). The architecture is read from the
file: a stack of Linear layers named `net.<i>.weight`/`net.<i>.bias`, ReLU between them, one output.

On by default when weights are configured, off otherwise: a head runs exactly when its weights path is
set, and a sample is kept when every configured head scores it at most its threshold (`*_max`), the
paper's rule for watermarks (`pwatermark > 0.5` removed) applied to both.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.checkpoint import load_weights
# re-exported: the config lives with the other filters
from pipelines.images.filters import PixelFilterConfig  # noqa: F401
from pipelines.manifest import sha256_file

HEADS = ("nsfw", "watermark")


class EmbeddingHead(nn.Module):
    """Linear layers with ReLU between them, one logit out: `hidden=()` is linear + sigmoid."""

    def __init__(self, dim: int, hidden: Sequence[int] = ()):
        super().__init__()
        sizes = [dim, *hidden, 1]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb).squeeze(-1)  # (B,) logits


def _hidden_sizes(state_dict: dict[str, torch.Tensor], path: str) -> tuple[int, list[int]]:
    """(input dim, hidden sizes) from the `net.<i>.weight` shapes, in layer order."""
    weights = sorted(((int(m.group(1)), v) for k, v in state_dict.items()
                      if (m := re.fullmatch(r"net\.(\d+)\.weight", k))), key=lambda item: item[0])
    if not weights or any(w.ndim != 2 for _, w in weights):
        raise ValueError(f"{path}: not an embedding head (expected Linear weights named net.<i>.weight)")
    if weights[-1][1].shape[0] != 1:
        raise ValueError(f"{path}: the head's last layer has {weights[-1][1].shape[0]} outputs, expected 1")
    return weights[0][1].shape[1], [w.shape[0] for _, w in weights[:-1]]


def load_head(path: str, dim: int) -> EmbeddingHead:
    """An `EmbeddingHead` for `dim`-wide embeddings from a local weights file, in eval mode.
    FileNotFoundError names the path when it is absent; a head made for another CLIP is refused."""
    state_dict, _ = load_weights(path)
    in_dim, hidden = _hidden_sizes(state_dict, str(path))
    if in_dim != dim:
        raise ValueError(f"{path}: head takes {in_dim}-dim embeddings, the CLIP model gives {dim}")
    head = EmbeddingHead(dim, hidden)
    head.load_state_dict(state_dict)
    return head.eval()


@torch.no_grad()
def score(head: EmbeddingHead, emb: torch.Tensor) -> torch.Tensor:
    """Probabilities (B,) that each embedding (B, D) shows what the head detects."""
    param = next(head.parameters())
    return torch.sigmoid(head(emb.to(param.device, param.dtype))).float()


def load_heads(cfg: PixelFilterConfig | None, dim: int) -> dict[str, EmbeddingHead]:
    """The configured heads by name; empty when filters are off."""
    if cfg is None:
        return {}
    return {name: load_head(path, dim) for name, path in cfg.weights().items()}


def filter_identity(cfg: PixelFilterConfig | None) -> dict[str, Any] | None:
    """What the pixel-filter columns depend on: each head's weights hash and its threshold.
    None when filters are off. Raises FileNotFoundError naming a configured head file that is absent."""
    if cfg is None or not cfg.enabled:
        return None
    heads = {}
    for name, path in cfg.weights().items():
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name} head weights not found: {path}") from None
        heads[name] = {"sha256": digest, "max": cfg.threshold(name)}
    return heads


def keep_mask(cfg: PixelFilterConfig, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """True where every configured head scores at most its threshold."""
    keep = None
    for name, probs in scores.items():
        ok = probs <= cfg.threshold(name)
        keep = ok if keep is None else keep & ok
    if keep is None:
        raise ValueError("keep_mask needs the score of at least one head")
    return keep
