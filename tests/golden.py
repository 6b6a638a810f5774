"""The frames the tests compare the samplers and the cascade against: the tiny preset with seeded random
weights, every use, every sampler, the temporal stage's aids on. `python tests/golden.py` rewrites
tests/data/golden_tiny.safetensors; do so only for a change that is meant to change sampled frames."""
from __future__ import annotations

from pathlib import Path

import torch

from model.cascade import build_cascade
from model.cascade_uses import animate_image, interpolate_images, text_to_video, vary_video
from model.config import SamplerConfig, cascade_preset

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.safetensors"
PROMPTS = ["a red circle on a blue background", "a small green square on gray"]


def _aided(sampler: str):
    """The tiny preset with every sampling aid of the temporal stage on, all stages on `sampler`."""
    cfg = cascade_preset("tiny")
    steps = SamplerConfig(name=sampler, steps=4, guidance_scale=2.0, eta=0.5 if sampler == "ddim" else 0.0)
    update = {s: getattr(cfg, s).model_copy(update={"sampler": steps})
              for s in ("prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")}
    update["temporal"] = update["temporal"].model_copy(update={
        "candidates": 2, "jump_penalty": 0.3, "keyframe": "middle", "keyframe_guidance": 5.0,
        "keyframe_guidance_stop": 0.3, "keyframe_draws": 2})
    return cfg.model_copy(update=update)


def golden_frames() -> dict[str, torch.Tensor]:
    """Every stage output of every run, keyed `<run>/<stage>`."""
    out = {}
    torch.manual_seed(0)
    plain = build_cascade(cascade_preset("tiny"), stages=("decoder", "prior", "temporal", "interpolation",
                                                         "sr_low", "sr_high"))
    runs = {"text": text_to_video(plain, PROMPTS, fps=8, seed=3, progress=False)}
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    other = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    runs["animate"] = animate_image(plain, image, fps=8, seed=5, progress=False)
    runs["interpolate"] = interpolate_images(plain, image, other, fps=8, seed=6, progress=False)
    runs["vary"] = vary_video(plain, runs["text"]["temporal"][:1], fps=8, seed=7, progress=False)
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        aided = build_cascade(_aided(sampler), {s: n.state_dict() for s, n in plain.nets.items()}
                              | {"clip": plain.clip.state_dict()},
                              stages=tuple(plain.nets))
        runs[f"aided_{sampler}"] = text_to_video(aided, PROMPTS, fps=8, seed=11, stop_at="sr_low", progress=False)
    for run, result in runs.items():
        for stage, value in result.outputs.items():
            out[f"{run}/{stage}"] = value.detach().float().contiguous()
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    save_file(golden_frames(), str(GOLDEN))
    print(f"wrote {GOLDEN}")
