"""Training settings per stage. The pipeline layer composes them with the model and data configs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import ConfigBase

STAGES = ("clip", "prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")


class StageTrainConfig(ConfigBase):
    """How one stage trains: optimisation, precision, scale-out and checkpoint cadence."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1, description="global batch per optimiser step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 = off")
    grad_accum: int = Field(1, ge=1)
    shuffle_buffer: int = Field(1000, ge=0, description="samples held to shuffle the stream across shard order "
                                "(0: shard order); a contrastive loss needs new negatives each epoch")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    trainable: Literal["all", "temporal"] = Field(
        "all", description="temporal: train only what inflation added to the image decoder (temporal layers, "
        "fps embedding) and keep its spatial weights as trained on images; for the video stages")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    num_workers: int = Field(1, ge=1, description="Ray Train workers (processes)")
    use_gpu: bool = False
    cpus_per_worker: int | None = Field(None, ge=1, description="CPU cores each worker reserves, and its torch "
                                        "threads; None: the smallest node's cores / num_workers (at least 1)")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(500, ge=1)
    max_failures: int = Field(2, ge=0, description="FailureConfig restarts from the last checkpoint")
    seed: int = 0
    # Video stages: each clip is drawn at an fps ~ fps_min + Beta * (fps_max - fps_min) whose mean moves
    # from fps_mean[0] to fps_mean[1] of the range over training (training.loaders.clips.FpsSchedule);
    # low fps = long frame strides = large motion per frame. A video too short for the stride gets the
    # lowest fps that fits, and the model is conditioned on the fps it really got.
    fps_min: int = Field(1, ge=1)
    fps_max: int = Field(30, ge=1)
    fps_mean: tuple[float, float] = Field((0.25, 0.75), description="the fps Beta's mean, as a share of "
                                          "[fps_min, fps_max], at the start and at the end of training")

    @model_validator(mode="after")
    def _fps_range(self) -> "StageTrainConfig":
        if self.fps_min > self.fps_max:
            raise ValueError(f"fps_min {self.fps_min} is above fps_max {self.fps_max}")
        if not all(0 < m < 1 for m in self.fps_mean):
            raise ValueError(f"fps_mean values must lie strictly between 0 and 1, got {self.fps_mean}")
        return self


class TrainConfig(ConfigBase):
    """All stages, trained in the order of STAGES, tracked in one MLflow experiment."""

    experiment: str = "make-a-video"
    tracking_uri: str | None = Field(None, description="None: a sqlite file in the run folder")
    clip: StageTrainConfig = StageTrainConfig()
    prior: StageTrainConfig = StageTrainConfig()
    decoder: StageTrainConfig = StageTrainConfig()
    temporal: StageTrainConfig = StageTrainConfig()
    interpolation: StageTrainConfig = StageTrainConfig()
    sr_low: StageTrainConfig = StageTrainConfig()
    sr_high: StageTrainConfig = StageTrainConfig()

    def stage(self, name: str) -> StageTrainConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        return getattr(self, name)


def _all(**kw) -> dict:
    return {s: StageTrainConfig(**kw) for s in STAGES}


def train_preset(name: str) -> TrainConfig:
    if name == "tiny":
        # Shard order (no shuffle buffer): the tests' datasets are one or two batches per epoch, and with
        # the buffer the 4 steps of the residual sr_high stage raised its loss (0.0034 -> 0.0035).
        return TrainConfig(**_all(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                                  sample_every=4, lr=1e-3, shuffle_buffer=0))
    if name == "toy":
        # Sized so that `make demo` trains every stage on a 2-core CPU in well under an hour (README has the
        # measured figures): the decoder gets most of it, as the toy world's quality bar rests on CLIP
        # encoding the shape and the decoder drawing it. CLIP reads 32 px images (the base size): a step costs
        # a fifth of one at 64 px, and shape is learnt sooner and less at the seed's mercy. In-memory runs,
        # zero-shot shape on 1000 held-out images: the seed that at 64 px read 0.32 after 600 steps read 0.74
        # at 32 px after 600 and 0.90 after 800; over three seeds, 0.75 / 0.90 / 0.75 after 1200 steps, and
        # seed 0 with 2400 steps 0.86.
        common = dict(warmup_steps=20, checkpoint_every=100, log_every=10, lr=5e-4, ema_decay=0.99)
        stages = {
            # No gradient clipping for CLIP (open_clip's default): with the same init and batches, clipping at
            # 1.0 left the image embeddings telling shapes apart 0.53 of the time after 600 steps against
            # 0.87 without (another seed: 0.30 against 0.42 after 400).
            "clip": StageTrainConfig(steps=2400, batch_size=128, sample_every=2400,
                                     **{**common, "lr": 2e-3, "grad_clip": 0.0}),
            "prior": StageTrainConfig(steps=800, batch_size=64, sample_every=800, **common),
            # 3600 decoder steps: in-memory runs on a demo's images and CLIP embeddings (160 images drawn from
            # the TRUE embedding), the decoder drew the right shape 0.94 of the time after 3600 steps, 0.89
            # at step 2400 of the same run; the 2400-step demo decoder read 0.61 on the same images.
            "decoder": StageTrainConfig(steps=3600, batch_size=32, sample_every=3600,
                                        **{**common, "lr": 1e-3, "ema_decay": 0.995, "checkpoint_every": 200}),
            # History (every weight trained then): 600 steps read base-stage faithfulness 0.41 against 0.29
            # after 300 (16 videos, same seeds). Batch 8: retrained on one demo's weights, 16 prompts x 4
            # samples, consistency 0.80 / 0.79 / 0.86 over three training seeds against 0.74 / 0.73 / 0.75 at
            # batch 4, faithfulness alike (0.67 / 0.61 / 0.66 against 0.58 / 0.67 / 0.65); batch 16 did not add
            # to it. Dt costs 8.5 min instead of 5.2.
            # Clips at 4-12 fps (mean 8, the rate the demo samples at): at the default schedule's 8 -> 23 fps,
            # the late steps' 8-frame clips showed a drift covering a third of what 8 fps shows.
            # Only the temporal layers and the fps embedding train; the image decoder's spatial weights stay as
            # learnt on images. Training every weight on the 3-4 s world's 300 clips lost the shape at Dt
            # (session 20, base stage: shape read 0.58). lr 1e-3 and 800 steps, as the identity-initialised layers
            # start from nothing (15.9 min here, 14.4 for session 20's 600 steps of every weight). From-scratch
            # demos, 16 prompts x 2 after sr_high: faithfulness / consistency / motion share 0.79 / 0.87 / 0.97
            # (session 21) against 0.68 / 0.83 / 0.94 training every weight (session 20); session 22's demo of
            # this Dt (with 6 candidates and a longer SR_l, since reverted) read 0.56 / 0.78 / 0.81, already
            # lower at the base stage: one run, not the preset's figure. docs/QUALITY.md.
            "temporal": StageTrainConfig(steps=800, batch_size=8, sample_every=800, fps_min=4, fps_max=12,
                                         fps_mean=(0.5, 0.5), **{**common, "lr": 1e-3, "trainable": "temporal"}),
            "interpolation": StageTrainConfig(steps=150, batch_size=4, sample_every=150, **common),
            # The SR stages cost the most per sample on a CPU (64 px video, 128 px frames): fewer, smaller steps.
            "sr_low": StageTrainConfig(steps=60, batch_size=2, sample_every=60, **common),
            "sr_high": StageTrainConfig(steps=80, batch_size=4, sample_every=80, **common),
        }
        return TrainConfig(**stages)
    if name == "paper":
        stages = _all(steps=200_000, batch_size=256, warmup_steps=2000, checkpoint_every=5000, log_every=50,
                      sample_every=5000, num_workers=8, use_gpu=True, precision="bf16", lr=1e-4, ema_decay=0.9999)
        return TrainConfig(**stages)
    raise ValueError(f"unknown preset {name!r}; choose one of ['paper', 'tiny', 'toy']")
