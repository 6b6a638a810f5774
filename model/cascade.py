"""The cascade's networks and the bookkeeping of its runs: the `Cascade` built from a CascadeConfig, which
networks each use needs, per-stage seeds and the outputs.

    video = SR_h(SR_l(F(Dt(P(text), fps))))

The stages are sampled in `model.cascade_stages`; the paper's four uses chain them in `model.cascade_uses`.
Outputs are keyed by stage name: "prior" holds the conditioning CLIP image embedding (B, D) (sampled by
the prior for text, computed from pixels otherwise); the others videos (B, C, F, H, W) in [-1, 1].
Every stage draws its noise from its own CPU generator seeded from (seed, stage) (`stage_seed`), so a
stage's result does not depend on how many draws an earlier stage made, and CPU and GPU runs start from the
same noise.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from model.clip import build_clip
from model.config import CascadeConfig
from model.networks import build_network
from model.precision import Precision, default_precision

STAGE_ORDER = ("prior", "temporal", "interpolation", "sr_low", "sr_high")
# The networks each use runs, in order; "prior" of the image/video uses is CLIP alone.
USES: dict[str, tuple[str, ...]] = {
    "text": ("prior", "temporal", "interpolation", "sr_low", "sr_high"),
    "animate": ("interpolation", "sr_low", "sr_high"),
    "interpolate": ("interpolation", "sr_low", "sr_high"),
    "vary": ("temporal", "interpolation", "sr_low", "sr_high"),
}
# Which network makes each stage's output, per use (animation and interpolation start with F).
_MAKER = {"temporal": {"animate": "interpolation", "interpolate": "interpolation"}}


@dataclass
class Cascade:
    """The built networks of one cascade, with CLIP, its tokenizer and the config they follow.
    `sources` says where each stage's weights came from (filled by the loader; empty = random weights)."""

    cfg: CascadeConfig
    clip: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    nets: dict[str, nn.Module]
    device: torch.device
    precision: Precision
    sr_high_chunk: int = 8  # frames per SR_h forward: bounds memory at 768 px
    sources: dict[str, dict] = field(default_factory=dict)

    def net(self, stage: str) -> nn.Module:
        if stage not in self.nets:
            raise ValueError(f"this cascade has no {stage!r} network (built: {sorted(self.nets)})")
        return self.nets[stage]


@dataclass
class CascadeOutput:
    """Stage outputs (see module doc) with the seed, fps and seconds of each stage that ran."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    fps: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, stage: str) -> torch.Tensor:
        return self.outputs[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.outputs

    @property
    def last_stage(self) -> str:
        return [s for s in STAGE_ORDER if s in self.outputs][-1]


def stages_needed(use: str, stop_at: str | None = None, cfg: CascadeConfig | None = None) -> tuple[str, ...]:
    """Networks (besides CLIP) a use runs up to `stop_at`: what a loader must provide. Given the cascade's
    config, the image decoder D too where Dt runs with `temporal.keyframe` set (D draws the key frame)."""
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; choose one of {sorted(USES)}")
    last = stop_index(stop_at)
    needed = {stage_network(use, s) for s in STAGE_ORDER[:last + 1]}
    if cfg is not None and cfg.temporal.keyframe != "none" and "temporal" in needed:
        needed.add("decoder")
    return tuple(s for s in ("decoder", *USES[use]) if s in needed)


def stage_network(use: str, stage: str) -> str:
    """The network that makes `stage`'s output in `use`: "clip" for the image/video uses' embedding,
    "interpolation" (F) for the base clip of animation and image interpolation, else the stage's own."""
    if stage == "prior" and use != "text":
        return "clip"
    return _MAKER.get(stage, {}).get(use, stage)


def stop_index(stop_at: str | None) -> int:
    if stop_at is None:
        return len(STAGE_ORDER) - 1
    if stop_at not in STAGE_ORDER:
        raise ValueError(f"stop_at must be one of {list(STAGE_ORDER)}, got {stop_at!r}")
    return STAGE_ORDER.index(stop_at)


def build_cascade(cfg: CascadeConfig, state_dicts: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
                  *, stages: Sequence[str] | None = None, device: torch.device | str = "cpu",
                  precision: Precision | None = None, sr_high_chunk: int = 8) -> Cascade:
    """Build CLIP and the networks of `stages` (default: what text-to-video runs). A stage whose weights are
    missing or None keeps its random initialisation: for tests and benchmarks only;
    pipelines.generate.load_cascade requires every weight. CLIP loads `state_dicts["clip"]`, else
    `cfg.clip.weights_path`, else stays random."""
    state_dicts = dict(state_dicts or {})
    device = torch.device(device)
    clip, _, tokenizer = build_clip(cfg.clip, device=device)
    if state_dicts.get("clip") is not None:
        clip.load_state_dict(state_dicts["clip"])
    nets = {}
    for stage in stages if stages is not None else stages_needed("text", None, cfg):
        net = build_network(stage, cfg)
        if state_dicts.get(stage) is not None:
            net.load_state_dict(state_dicts[stage])
        nets[stage] = net.to(device).eval().requires_grad_(False)
    return Cascade(cfg, clip.requires_grad_(False).eval(), tokenizer, nets, device,
                   precision or default_precision(device), sr_high_chunk)


def stage_seed(seed: int, stage: str) -> int:
    """A stage's seed, derived from the run's seed and the stage name (stable across Python runs)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:8], "little") & (2**63 - 1)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) in [-1, 1] -> (B, F, H, W, C) uint8 on CPU, the layout encoders take."""
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu()
