"""Pseudo-3D building blocks (Make-A-Video, paper eq. 2 and 3) shared by the image and the video U-Nets.

Inside the U-Net activations live folded as (B*F, C, H, W): every spatial op then sees plain images, so the
same weights serve the image model D and the video model Dt. Temporal layers unfold to (B*H*W, C, F), mix
frames, and fold back. They start as the identity (dirac conv, zero-initialised attention output), which is
what makes an inflated Dt equal D frame by frame. A temporal layer is skipped when the net has none
(`temporal=False`), when `enable_time` is False, or when there is a single frame.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn


def group_count(channels: int) -> int:
    """GroupNorm groups: 32 like ADM where the width allows, and at least 4 channels per group.
    ADM's 32 groups assume >= 128 channels; on a 32-channel net they would be one channel each, an instance
    norm that removes every channel's spatial mean (a flat background's colour) at every block."""
    for groups in (32, 16, 8, 4, 2, 1):
        if channels % groups == 0 and channels // groups >= 4:
            return groups
    return 1


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal features of float values (timesteps, fps, noise levels). (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = Fn.pad(emb, (0, 1))
    return emb


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def resize(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of images (B, C, H, W) or videos (B, C, F, H, W) to size x size, frame by frame.
    antialias for downsampling (the low-res input an SR stage trains from); off for upsampling."""
    if x.dim() == 5:
        return unfold_frames(resize(fold_frames(x), size, antialias), x.shape[2])
    return Fn.interpolate(x, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False)


def _time_active(frames: int, enable_time: bool) -> bool:
    return enable_time and frames > 1


class TemporalConv(nn.Module):
    """Conv1D over frames (kernel 3), initialised to the identity: dirac weights, zero bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // frames
        y = x.reshape(b, frames, c, h, w).permute(0, 3, 4, 2, 1).reshape(b * h * w, c, frames)  # (B*H*W, C, F)
        y = self.conv(y)
        return y.reshape(b, h, w, c, frames).permute(0, 4, 3, 1, 2).reshape(bf, c, h, w)  # (B*F, C, H, W)


class PseudoConv3d(nn.Module):
    """ConvP3D(h) = Conv1D(Conv2D(h) o T) o T (paper eq. 2): a k x k spatial conv, then a temporal conv."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1,
                 temporal: bool = False) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(dim_in, dim_out, kernel_size, stride=stride, padding=kernel_size // 2)
        self.temporal = TemporalConv(dim_out) if temporal else None

    def forward(self, x: torch.Tensor, frames: int = 1, enable_time: bool = True) -> torch.Tensor:
        """x: (B*F, C, H, W) folded, or (B, C, F, H, W) which is folded and returned unfolded."""
        if x.dim() == 5:
            f = x.shape[2]
            return unfold_frames(self.forward(fold_frames(x), f, enable_time), f)
        x = self.spatial(x)
        if self.temporal is not None and _time_active(frames, enable_time):
            x = self.temporal(x, frames)
        return x


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention. Self-attention when `context` is None."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None, zero_out: bool = False) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, dim); context: (N, S, context_dim) -> (N, L, dim)."""
        n, length, dim = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        q, k, v = (t.reshape(n, -1, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))  # (N, h, L, d)
        out = Fn.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TemporalAttention(nn.Module):
    """Attn1D over frames, residual, with its output projection zero-initialised: the identity at init.

    A sinusoidal encoding of the frame index is added to the normalised input before q/k/v only, so it
    orders frames without touching the residual path (identity at init holds for any encoding)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, head_dim, zero_out=True)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (B*F, L, C) spatial tokens per frame -> same shape."""
        bf, length, c = x.shape
        b = bf // frames
        y = x.reshape(b, frames, length, c).transpose(1, 2).reshape(b * length, frames, c)  # (B*L, F, C)
        pos = sinusoidal_embedding(torch.arange(frames, device=x.device), c).to(y.dtype)  # (F, C)
        y = y + self.attn(self.norm(y) + pos)
        return y.reshape(b, length, frames, c).transpose(1, 2).reshape(bf, length, c)


class AttentionBlock(nn.Module):
    """AttnP3D (paper eq. 3): spatial self-attention, cross-attention to the condition tokens and a
    feed-forward on each frame's H*W tokens, then (when temporal) attention across frames."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, temporal: bool = False) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(channels)
        self.self_attn = Attention(channels, head_dim)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attn = Attention(channels, head_dim, context_dim=context_dim)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)
        self.temporal = TemporalAttention(channels, head_dim) if temporal else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int = 1,
                enable_time: bool = True) -> torch.Tensor:
        """x: (B*F, C, H, W) with context (B*F, S, context_dim), or x: (B, C, F, H, W) with context
        (B, S, context_dim), which is repeated per frame and the result returned unfolded."""
        if x.dim() == 5:
            f = x.shape[2]
            out = self.forward(fold_frames(x), context.repeat_interleave(f, dim=0), f, enable_time)
            return unfold_frames(out, f)
        bf, c, h, w = x.shape
        tokens = x.reshape(bf, c, h * w).transpose(1, 2)  # (B*F, H*W, C)
        tokens = tokens + self.self_attn(self.norm_self(tokens))
        tokens = tokens + self.cross_attn(self.norm_cross(tokens), context)
        tokens = tokens + self.ff(self.norm_ff(tokens))
        if self.temporal is not None and _time_active(frames, enable_time):
            tokens = self.temporal(tokens, frames)
        return tokens.transpose(1, 2).reshape(bf, c, h, w)
