"""The diffusion prior P (DALL-E 2 style): text -> CLIP image embedding.

A causal transformer reads [text tokens, text embedding, timestep, noised image embedding, query] and
predicts the clean image embedding at the query. Like the U-Net it knows nothing of diffusion.
The null condition for classifier-free guidance is None or all-zero rows at the interface; the net
swaps those rows for learned null vectors, so a batch may mix conditioned and unconditioned samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from model.config import PriorConfig
from model.layers import sinusoidal_embedding

_FIXED_TOKENS = 4  # text embedding, timestep, noised image embedding, query


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"prior width {width} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, W); mask: (B, 1, S, S) bool, True where a query may attend a key."""
        b, s, w = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, S, d)
        out = Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, s, w))


class PriorBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def _null_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) bool: rows that are all zero, i.e. the null condition."""
    return (x == 0).flatten(1).all(dim=1)


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, w = cfg.embed_dim, cfg.width
        self.text_tokens_proj = nn.Linear(d, w)  # per-token features of CLIP's text tower, (B, L, embed_dim)
        self.text_emb_proj = nn.Linear(d, w)
        self.image_proj = nn.Linear(d, w)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.null_text_tokens = nn.Parameter(torch.randn(cfg.text_len, w) * 0.02)
        self.null_text_emb = nn.Parameter(torch.randn(w) * 0.02)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(cfg.text_len + _FIXED_TOKENS, w) * 0.02)
        self.blocks = nn.ModuleList(PriorBlock(w, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, d)

    def _text(self, batch: int, text_emb: torch.Tensor | None, text_tokens: torch.Tensor | None,
              text_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> tokens (B, L, W), text embedding (B, 1, W), key mask of the tokens (B, L) bool."""
        cfg = self.cfg
        if text_tokens is None:
            tokens = self.null_text_tokens.expand(batch, -1, -1)
            valid = torch.ones(batch, cfg.text_len, dtype=torch.bool, device=device)
        else:
            if text_tokens.dim() != 3 or text_tokens.shape[1] > cfg.text_len or text_tokens.shape[2] != cfg.embed_dim:
                raise ValueError(f"text_tokens must be (B, L<={cfg.text_len}, {cfg.embed_dim}), "
                                 f"got {tuple(text_tokens.shape)}")
            length = text_tokens.shape[1]
            null = _null_rows(text_tokens)[:, None, None]
            tokens = torch.where(null, self.null_text_tokens[:length], self.text_tokens_proj(text_tokens))
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
            if text_mask is not None:
                valid = text_mask.to(torch.bool) | null[:, :, 0]
        if text_emb is None:
            emb = self.null_text_emb.expand(batch, -1)
        else:
            emb = torch.where(_null_rows(text_emb)[:, None], self.null_text_emb, self.text_emb_proj(text_emb))
        return tokens, emb[:, None], valid

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, D) noised image embedding; t: (B,); text_emb: (B, D); text_tokens: (B, L, D) per-token
        text features; text_mask: (B, L) bool, True on real tokens. Returns (B, D), the clean image embedding."""
        cfg = self.cfg
        if x_t.dim() != 2 or x_t.shape[1] != cfg.embed_dim:
            raise ValueError(f"x_t must be (B, {cfg.embed_dim}), got {tuple(x_t.shape)}")
        batch, device = x_t.shape[0], x_t.device
        tokens, emb, valid = self._text(batch, text_emb, text_tokens, text_mask, device)
        t = torch.as_tensor(t, device=device)
        time = self.time_embed(sinusoidal_embedding(t.expand(batch) if t.dim() == 0 else t, cfg.width))
        fixed = torch.cat([emb, time[:, None].to(emb.dtype), self.image_proj(x_t)[:, None],
                           self.query.expand(batch, 1, -1).to(emb.dtype)], dim=1)  # (B, 4, W)
        length = tokens.shape[1]
        h = torch.cat([tokens + self.pos_emb[:length], fixed + self.pos_emb[cfg.text_len:]], dim=1)  # (B, S, W)
        s = h.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        keys = torch.cat([valid, torch.ones(batch, _FIXED_TOKENS, dtype=torch.bool, device=device)], dim=1)
        mask = (causal[None] & keys[:, None]) | torch.eye(s, dtype=torch.bool, device=device)  # every row sees itself
        for block in self.blocks:
            h = block(h, mask[:, None])
        return self.out(self.norm_out(h[:, -1]))
