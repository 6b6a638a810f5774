"""Training settings per stage. The pipeline layer composes them with the model and data configs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import ConfigBase

STAGES = ("clip", "prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")
PLANNED_STAGES = STAGES[1:]  # the diffusion stages `training.plan` traces; CLIP is pretrained or toy-sized
VIDEO_DATASETS = ("webvid", "hdvila")  # what the video flow records as each clip's `dataset`
VideoDataset = Literal["webvid", "hdvila"]


class StageTrainConfig(ConfigBase):
    """How one stage trains: optimisation, precision, scale-out and checkpoint cadence."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1, description="global batch per optimiser step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 = off")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per optimiser step on each worker; None: "
                                   "the plan's (gpu_memory set), else 1")
    grad_checkpointing: bool | None = Field(None, description="recompute every U-Net block in backward; None: the "
                                            "plan's (gpu_memory set), else the network config's")
    sharding: Literal["ddp", "fsdp"] | None = Field(None, description="ddp: a full replica per worker; fsdp: FSDP2, "
                                                    "every block sharded over the workers; None: the plan's "
                                                    "(gpu_memory set), else ddp")
    gpu_memory: str | None = Field(None, description="memory of one GPU, e.g. 80GB: the stage is planned for "
                                   "num_workers such GPUs (training.plan, `mav plan`), which fills grad_accum, "
                                   "grad_checkpointing and sharding where they are None")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held to shuffle the stream across shard order "
                                "(0: shard order); a contrastive loss needs new negatives each epoch")
    video_datasets: tuple[VideoDataset, ...] | None = Field(
        None, min_length=1, description="video stages: train only on clips whose shard metadata names one of these "
        "datasets (the video flow records each clip's `dataset`); None: every clip of the video folder")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per Ray worker that decode samples "
                                "ahead of the step (training/data.py); 0: decode in the training loop")
    data_split: Literal["auto", "shards", "samples"] = Field(
        "auto", description="shards: each Ray worker reads its own shards; samples: every worker walks all shards "
        "and keeps its share of each global batch (N workers train as one); auto: shards when there are at "
        "least as many shards as workers")
    image_steps: int = Field(0, ge=0, description="sr_low: the first image_steps steps train on images of the image "
                             "folder at sr_low_size with the temporal layers skipped (they stay at their identity "
                             "start), then the clips; the paper trains SR_l on images before video")
    frame_share: float = Field(0.0, ge=0, lt=1, description="sr_high: the share of each batch made of single "
                               "frames of clips (the video folder) beside the images; the paper trains SR_h on "
                               "images and video frames")
    crop_size: int | None = Field(None, ge=8, description="sr_high: train on random crops of this side of the "
                                  "target (the network is convolutional), so that frames of clips stored below "
                                  "sr_high_size are targets too; None: whole images")
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
    pretrained_clip: bool = Field(False, description="real runs: CLIP comes from cascade.clip.weights_path, which "
                                  "must be set, and the clip stage is never trained; off: the toy world's CLIP")
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


# Make-A-Video's data per video stage: Dt and SR_l on WebVid-10M, F on WebVid-10M and HD-VILA-100M.
PAPER_VIDEO_DATASETS: dict[str, tuple[VideoDataset, ...]] = {
    "temporal": ("webvid",), "interpolation": ("webvid", "hdvila"), "sr_low": ("webvid",)}


# 3 GiB of it is the plan's reserve; the rest holds every tiny stage's state and makes some stages
# accumulate or checkpoint, as the paper preset's 80GB does for its large ones.
PAPER_CPU_GPU_MEMORY = "3140MB"


def _all(**kw) -> dict:
    return {s: StageTrainConfig(**kw) for s in STAGES}


def train_preset(name: str) -> TrainConfig:
    if name == "tiny":
        # Shard order (no shuffle buffer): the tests' datasets are one or two batches per epoch, and with
        # the buffer the 4 steps of the residual sr_high stage raised its loss (0.0034 -> 0.0035).
        return TrainConfig(**_all(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                                  sample_every=4, lr=1e-3, shuffle_buffer=0))
    if name == "toy":
        # Sized so that `make demo` trains every stage on a 2-core CPU in under 90 minutes (README has the
        # figure): the decoder gets most of it, as the quality bar rests on CLIP encoding the shape and the
        # decoder drawing it. CLIP reads 32 px images: a fifth of the cost of 64 px, and shape is learnt sooner
        # and less at the seed's mercy (docs/TRAINING.md).
        common = dict(warmup_steps=20, checkpoint_every=100, log_every=10, lr=5e-4, ema_decay=0.99)
        stages = {
            # No gradient clipping for CLIP (open_clip's default): clipping at 1.0 slows its learning of shape.
            "clip": StageTrainConfig(steps=2400, batch_size=128, sample_every=2400,
                                     **{**common, "lr": 2e-3, "grad_clip": 0.0}),
            "prior": StageTrainConfig(steps=800, batch_size=64, sample_every=800, **common),
            # 3600 decoder steps: where drawing the right shape from a true CLIP embedding levels off.
            "decoder": StageTrainConfig(steps=3600, batch_size=32, sample_every=3600,
                                        **{**common, "lr": 1e-3, "ema_decay": 0.995, "checkpoint_every": 200}),
            # Only the temporal layers and the fps embedding train: on 300 short clips, training every weight
            # loses the shape the decoder learnt on images. Batch 8 for consistency; clips at 4-12 fps, around
            # the 8 fps the demo samples at. lr 1e-3 and 800 steps, as those layers start from the identity.
            # docs/TRAINING.md has the figures.
            "temporal": StageTrainConfig(steps=800, batch_size=8, sample_every=800, fps_min=4, fps_max=12,
                                         fps_mean=(0.5, 0.5), **{**common, "lr": 1e-3, "trainable": "temporal"}),
            "interpolation": StageTrainConfig(steps=150, batch_size=4, sample_every=150, **common),
            # The SR stages cost the most per sample on a CPU (64 px video, 128 px frames): fewer, smaller steps.
            "sr_low": StageTrainConfig(steps=60, batch_size=2, sample_every=60, **common),
            "sr_high": StageTrainConfig(steps=80, batch_size=4, sample_every=80, **common),
        }
        return TrainConfig(**stages)
    if name == "paper":
        # Planned for 8 x 80GB per stage (training.plan): accumulation, checkpointing and sharding come from
        # the plan. CLIP is pretrained, not planned. The video stages read the paper's datasets.
        stages = _all(steps=200_000, batch_size=256, warmup_steps=2000, checkpoint_every=5000, log_every=50,
                      sample_every=5000, num_workers=8, use_gpu=True, precision="bf16", lr=1e-4, ema_decay=0.9999,
                      gpu_memory="80GB")
        stages["clip"] = stages["clip"].model_copy(update={"gpu_memory": None})
        for stage, datasets in PAPER_VIDEO_DATASETS.items():
            stages[stage] = stages[stage].model_copy(update={"video_datasets": datasets})
        # SR_l on images, then video (the paper gives no split: a quarter of its steps on images); SR_h on
        # images and video frames, as 192 px crops (64 px low-res) that 256 px clips also give.
        stages["sr_low"] = stages["sr_low"].model_copy(update={"image_steps": 50_000})
        stages["sr_high"] = stages["sr_high"].model_copy(update={"frame_share": 0.5, "crop_size": 192})
        return TrainConfig(pretrained_clip=True, **stages)
    if name == "paper-cpu":
        return _paper_cpu()
    raise ValueError(f"unknown preset {name!r}; choose one of ['paper', 'paper-cpu', 'tiny', 'toy']")


def _paper_cpu() -> TrainConfig:
    """The paper's training at CPU sizes: pretrained CLIP, its per-stage video datasets, every planned stage
    resolved by the memory plan, here for one GPU of PAPER_CPU_GPU_MEMORY."""
    paper = train_preset("paper")
    # One step per stage, no preview samples (sample_every past the end): the run shows the path, not a model.
    small = dict(steps=1, batch_size=4, warmup_steps=0, checkpoint_every=1, log_every=1, sample_every=1000,
                 num_workers=1, use_gpu=False, precision="fp32", shuffle_buffer=0,
                 # Decoding in the training loop: a loader process costs more than the one step it feeds.
                 loader_workers=0)
    stages = {s: paper.stage(s).model_copy(update=small) for s in STAGES}
    # The paper's routing at these sizes: one image step then one clip step for sr_low; sr_high on 24 px crops
    # (8 px low-res) of images and of frames of the 32 px clips, half of each.
    stages["sr_low"] = stages["sr_low"].model_copy(update={"steps": 2, "image_steps": 1, "checkpoint_every": 2})
    stages["sr_high"] = stages["sr_high"].model_copy(update={"crop_size": 24})
    for s in PLANNED_STAGES:
        stages[s] = stages[s].model_copy(update={"gpu_memory": PAPER_CPU_GPU_MEMORY})
    return TrainConfig.model_validate(paper.model_copy(update=stages).model_dump())
