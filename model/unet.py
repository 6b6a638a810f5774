"""The (pseudo-3D) U-Net of every image and video stage: D, Dt, F, SR_l and SR_h.

It maps (x, t, cond) -> output and knows nothing of diffusion: `t` is any float per sample, and what the
output means (eps, v, x0) is the diffusion code's business. 4D input runs the image model; 5D input
(B, C, F, H, W) the video model, whose temporal layers are skipped when `temporal=False`, F == 1 or
`enable_time=False`. Conditioning: a CLIP image embedding (cross-attention tokens and the time
embedding), fps (video), and for super-resolution the low-res input and its noise-augmentation level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import UNetConfig
from model.layers import (AttentionBlock, PseudoConv3d, fold_frames, group_count, resize, sinusoidal_embedding,
                          unfold_frames)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-ConvP3D twice, with the embedding as scale-shift on the second norm (ADM)."""

    def __init__(self, dim_in: int, dim_out: int, emb_dim: int, temporal: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(dim_in), dim_in)
        self.conv1 = PseudoConv3d(dim_in, dim_out, temporal=temporal)
        self.emb = nn.Linear(emb_dim, 2 * dim_out)
        self.norm2 = nn.GroupNorm(group_count(dim_out), dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = PseudoConv3d(dim_out, dim_out, temporal=temporal)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int, enable_time: bool) -> torch.Tensor:
        """x: (B*F, C, H, W); emb: (B*F, E)."""
        h = self.conv1(Fn.silu(self.norm1(x)), frames, enable_time)
        scale, shift = self.emb(Fn.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(Fn.silu(h)), frames, enable_time)
        return self.skip(x) + h


class Resample(nn.Module):
    """Spatial down (stride-2 conv) or up (nearest x2 then conv) sampling; frames are never resampled."""

    def __init__(self, channels: int, mode: str, temporal: bool) -> None:
        super().__init__()
        self.mode = mode
        self.conv = PseudoConv3d(channels, channels, stride=2 if mode == "down" else 1, temporal=temporal)

    def forward(self, x: torch.Tensor, frames: int, enable_time: bool) -> torch.Tensor:
        if self.mode == "up":
            x = Fn.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x, frames, enable_time)


class UNetBlock(nn.Module):
    """One step of the U-Net: an optional ResBlock, attention and resampling, all with one signature."""

    def __init__(self, res: ResBlock | None = None, attn: AttentionBlock | None = None,
                 resample: Resample | None = None) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int,
                enable_time: bool) -> torch.Tensor:
        if self.res is not None:
            x = self.res(x, emb, frames, enable_time)
        if self.attn is not None:
            x = self.attn(x, ctx, frames, enable_time)
        if self.resample is not None:
            x = self.resample(x, frames, enable_time)
        return x


def _embedder(dim_in: int, dim_out: int, zero_last: bool = False) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim_in, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))
    if zero_last:  # a new conditioning added to a trained net leaves its function unchanged at init
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
    return mlp


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        emb_dim = self.emb_dim = 4 * cfg.base_channels
        temporal = cfg.temporal
        self.time_embed = _embedder(cfg.base_channels, emb_dim)
        self.cond_embed = nn.Linear(cfg.cond_dim, emb_dim)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.cond_tokens * emb_dim)
        self.cond_norm = nn.LayerNorm(emb_dim)
        # Scale-shift and cross-attention act the same at every pixel (and attention has no positions), so a
        # layout the embedding names reaches the pixels only through padding effects; a per-position map,
        # zero at init, gives the embedding a direct say in where things go.
        self.cond_map = nn.Linear(cfg.cond_dim, widths[0] * cfg.cond_map ** 2) if cfg.cond_map else None
        if self.cond_map is not None:
            nn.init.zeros_(self.cond_map.weight)
            nn.init.zeros_(self.cond_map.bias)
        self.fps_embed = _embedder(cfg.base_channels, emb_dim, zero_last=True) if temporal and cfg.fps_cond else None
        self.noise_embed = _embedder(cfg.base_channels, emb_dim) if cfg.lowres_cond else None

        def res(dim_in: int, dim_out: int) -> ResBlock:
            return ResBlock(dim_in, dim_out, emb_dim, temporal, cfg.dropout)

        def attn(level: int, dim: int) -> AttentionBlock | None:
            return AttentionBlock(dim, cfg.head_dim, emb_dim, temporal) if level in cfg.attn_levels else None

        self.conv_in = PseudoConv3d(self.input_channels, widths[0], temporal=temporal)
        skips, ch = [widths[0]], widths[0]
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(UNetBlock(res(ch, width), attn(level, width)))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(UNetBlock(resample=Resample(ch, "down", temporal)))
                skips.append(ch)
        # the bottleneck attends whenever the net has attention at all (ADM, Imagen)
        mid_attn = AttentionBlock(ch, cfg.head_dim, emb_dim, temporal) if cfg.attn_levels else None
        self.mid = nn.ModuleList([UNetBlock(res(ch, ch), mid_attn), UNetBlock(res(ch, ch))])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(cfg.num_res_blocks + 1):
                up = Resample(widths[level], "up", temporal) if level > 0 and i == cfg.num_res_blocks else None
                self.up.append(UNetBlock(res(ch + skips.pop(), widths[level]), attn(level, widths[level]), up))
                ch = widths[level]
        self.norm_out = nn.GroupNorm(group_count(ch), ch)
        self.conv_out = PseudoConv3d(ch, cfg.out_channels, temporal=temporal)
        if cfg.lowres_cond:  # an SR net starts at zero output: a residual x0 stage then returns the upsample
            nn.init.zeros_(self.conv_out.spatial.weight)
            nn.init.zeros_(self.conv_out.spatial.bias)

    @property
    def input_channels(self) -> int:
        """Channels of the first conv: x, the caller's extra channels, then the upsampled low-res input."""
        cfg = self.cfg
        return cfg.in_channels + cfg.extra_in_channels + (cfg.in_channels if cfg.lowres_cond else 0)

    def _cond(self, batch: int, cond_emb: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """The embedding at unit scale per entry: CLIP's unit-norm vectors have entries ~1/sqrt(D), which
        would start the conditioning far below the time embedding. None = the null condition (zeros)."""
        cfg = self.cfg
        if cond_emb is None:
            return torch.zeros(batch, cfg.cond_dim, device=device, dtype=dtype)
        return cond_emb.to(dtype) * cfg.cond_dim ** 0.5

    def _layout(self, cond: torch.Tensor, h: torch.Tensor, frames: int) -> torch.Tensor:
        """The cond_map of `_cond`'s embedding (B, D) for features h (B*F, C, H, W): (B*F, C, H, W),
        bilinear from cond_map x cond_map."""
        side = self.cfg.cond_map
        grid = self.cond_map(cond).reshape(cond.shape[0], -1, side, side)
        grid = Fn.interpolate(grid, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return grid.repeat_interleave(frames, dim=0) if frames > 1 else grid

    def _embed(self, batch: int, t: torch.Tensor, cond_emb: torch.Tensor | None, fps: torch.Tensor | None,
               noise_level: torch.Tensor | None, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> embedding (B, E), cross-attention tokens (B, cond_tokens, E) and the scaled condition (B, D)
        (`_cond`). cond_emb None = the null condition."""
        cfg = self.cfg
        t = torch.as_tensor(t, device=device)
        emb = self.time_embed(sinusoidal_embedding(t.expand(batch) if t.dim() == 0 else t, cfg.base_channels))
        cond = self._cond(batch, cond_emb, device, emb.dtype)
        emb = emb + self.cond_embed(cond)
        ctx = self.cond_norm(self.cond_proj(cond).reshape(batch, cfg.cond_tokens, self.emb_dim))
        if fps is not None:
            if self.fps_embed is None:
                raise ValueError("fps given to a net without fps conditioning (needs temporal=True, fps_cond=True)")
            emb = emb + self.fps_embed(sinusoidal_embedding(torch.as_tensor(fps, device=device).expand(batch),
                                                            cfg.base_channels))
        if self.noise_embed is not None:
            level = torch.as_tensor(0 if noise_level is None else noise_level, device=device)
            emb = emb + self.noise_embed(sinusoidal_embedding(level.expand(batch), cfg.base_channels))
        elif noise_level is not None:
            raise ValueError("noise_level given to a net without lowres_cond")
        return emb, ctx, cond

    def _with_lowres(self, x: torch.Tensor, lowres: torch.Tensor | None) -> torch.Tensor:
        """Upsample the low-res input (bilinear) to x's size and concatenate it on channels."""
        if not self.cfg.lowres_cond:
            if lowres is not None:
                raise ValueError("lowres given to a net without lowres_cond")
            return x
        if lowres is None:
            raise ValueError("this super-resolution net needs `lowres`")
        if lowres.dim() != x.dim() or lowres.shape[1] != self.cfg.in_channels:
            raise ValueError(f"lowres shape {tuple(lowres.shape)} does not match x {tuple(x.shape)}")
        if x.dim() == 5 and lowres.shape[2] != x.shape[2]:
            raise ValueError(f"lowres has {lowres.shape[2]} frames, x has {x.shape[2]}")
        return torch.cat([x, resize(lowres, x.shape[-1]).to(x.dtype)], dim=1)

    def _run(self, block: UNetBlock, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int,
             enable_time: bool) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, ctx, frames, enable_time, use_reentrant=False)
        return block(h, emb, ctx, frames, enable_time)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor | None = None,
                fps: torch.Tensor | None = None, lowres: torch.Tensor | None = None,
                noise_level: torch.Tensor | None = None, enable_time: bool = True) -> torch.Tensor:
        """x: (B, C, H, W) image or (B, C, F, H, W) video, C = in_channels + extra_in_channels;
        t, fps: (B,); cond_emb: (B, cond_dim), None or zeros = the null condition; lowres: (B, C, [F,] h, w);
        noise_level: (B,) the low-res input's augmentation timestep (diffusion.noise_augment's t_aug),
        embedded like t, None = 0 (clean). Returns (B, out_channels, [F,] H, W)."""
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(x.shape)}")
        expected = self.cfg.in_channels + self.cfg.extra_in_channels
        if x.shape[1] != expected:
            raise ValueError(f"x has {x.shape[1]} channels, this net takes {expected}")
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        video, batch = x.dim() == 5, x.shape[0]
        frames = x.shape[2] if video else 1
        x = self._with_lowres(x, lowres)
        h = fold_frames(x) if video else x  # (B*F, C, H, W)
        emb, ctx, cond = self._embed(batch, t, cond_emb, fps, noise_level, x.device)
        if frames > 1:
            emb, ctx = emb.repeat_interleave(frames, dim=0), ctx.repeat_interleave(frames, dim=0)
        h = self.conv_in(h, frames, enable_time)
        if self.cond_map is not None:
            h = h + self._layout(cond, h, frames)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, ctx, frames, enable_time)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb, ctx, frames, enable_time)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, ctx, frames, enable_time)
        h = self.conv_out(Fn.silu(self.norm_out(h)), frames, enable_time)
        return unfold_frames(h, frames) if video else h


def apply_per_frame(net: nn.Module, video: torch.Tensor, chunk: int, **kwargs: object) -> torch.Tensor:
    """Run an image net (SR_h) on each frame of `video` (B, C, F, H, W), `chunk` frames at a time, so
    memory stays bounded. Keyword tensors shaped (B, C', F, h, w) are split per frame like the video
    (`lowres`); tensors with B rows (t, cond_emb, noise_level) are repeated per frame."""
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, F, H, W), got shape {tuple(video.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, _, f = video.shape[:3]
    folded: dict[str, object] = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 5:
            if value.shape[0] != b or value.shape[2] != f:
                raise ValueError(f"{name} shape {tuple(value.shape)} does not match video {tuple(video.shape)}")
            folded[name] = fold_frames(value)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != b:
                raise ValueError(f"{name} has {value.shape[0]} rows, video has batch {b}")
            folded[name] = value.repeat_interleave(f, dim=0)
        else:
            folded[name] = value
    frames = fold_frames(video)  # (B*F, C, H, W)
    outs = []
    for start in range(0, frames.shape[0], chunk):
        part = {k: v[start:start + chunk] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in folded.items()}
        outs.append(net(frames[start:start + chunk], **part))
    return unfold_frames(torch.cat(outs, dim=0), f)  # (B, C_out, F, H, W)
