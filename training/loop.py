"""The training loop of every stage, as Ray Train runs it on each worker (`train_loop_per_worker`).

One loop for all stages: build the stage (training/stages.py), spread it over the workers (DDP, or FSDP2 by
`train.sharding`: training/sharding.py), then AdamW with warm-up + cosine LR, gradient accumulation,
gradient clipping, an EMA of the weights (training/ema.py), autocast from model.precision, per-sample
seeded draws (so N workers compute what one worker computes on the same global batch). Side effects on
rank 0 only: MLflow metrics and previews (training/previews.py, from the EMA gathered under FSDP),
checkpoint folders (training/checkpoints.py, which also says how a restarted worker resumes). The chaos
knob (training/faults.py) stops a worker on purpose to exercise that restart.
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.inflate import is_added
from model.precision import autocast_context, default_precision, grad_scaler
from training.checkpoints import State, load_checkpoint, report_checkpoint
from training.config import StageTrainConfig
from training.ema import Ema
from training.faults import maybe_fail
from training.job import Job
from training.loaders.clips import FpsSchedule
from training.previews import write_preview
from training.routing import job_batches, second_kind
from training.sharding import is_sharded, skip_grad_sync
from training.stages import ImageView, SampleRng, Stage, after_step, build_stage
from training.tracker import NullTracker, Tracker
from training.tracking import MlflowTracker
from training.workers import RayWorker, Worker, global_mean

MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak LR, not to zero


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point (TorchTrainer's train_loop_per_worker). `threads`: the cores the worker
    reserved (training.jobs.worker_cpus); torch uses as many."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    run(Job.from_config(config), RayWorker())


def lr_factor(step: int, cfg: StageTrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to MIN_LR_RATIO at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def restrict_trainable(module: nn.Module, trainable: str, stage: str) -> None:
    """trainable "temporal": only the parameters inflation added (`model.inflate.is_added`) keep
    requires_grad; the rest stay as the stage was initialised (the image decoder's spatial weights)."""
    if trainable == "all":
        return
    added = False
    for name, param in module.named_parameters():
        keep = is_added(name)
        param.requires_grad_(keep)
        added |= keep
    if not added:
        raise ValueError(f"train.{stage}.trainable={trainable!r}, but stage {stage} has no temporal layers")


def build_state(job: Job, worker: Worker) -> tuple[Stage, State]:
    """The stage and its trained module spread over the workers by `train.sharding` (None: DDP), with its
    EMA (sharded alike), AdamW, LR schedule and grad scaler."""
    sharding = job.train.sharding or "ddp"
    if sharding == "fsdp" and precision(job, worker) == "fp16":  # the scaler's inf check is per rank
        raise ValueError(f"train.{job.stage}: sharding=fsdp trains in bf16 or fp32, not fp16")
    torch.manual_seed(job.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    stage, module = build_stage(job.stage, job.cascade, job.load, worker.device)
    restrict_trainable(module, job.train.trainable, job.stage)  # before DDP: it registers what trains
    module = module.to(worker.device)
    ema = Ema(module, job.train.ema_decay)  # before prepare: an FSDP2 module does not deep-copy
    # sr_low's image steps skip the temporal layers: DDP must expect parameters without gradients.
    net = worker.prepare(module, sharding, find_unused=second_kind(job.stage, job.train) == "images")
    raw = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    if is_sharded(raw):
        ema.shard_as(raw)
    optimizer = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=job.train.lr,
                                  weight_decay=job.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, job.train))
    scaler = grad_scaler(precision(job, worker), worker.device)
    return stage, State(net, raw, ema, optimizer, scheduler, scaler)


def precision(job: Job, worker: Worker) -> str:
    p = job.train.precision
    return default_precision(worker.device) if p == "auto" else p


def micro_batches(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    size = next(iter(batch.values())).shape[0]
    if size % parts:
        raise ValueError(f"a worker batch of {size} does not split into grad_accum={parts} parts")
    chunk = size // parts
    return [{k: v[i * chunk:(i + 1) * chunk] for k, v in batch.items()} for i in range(parts)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v if k == "seed" else v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(stage: Stage, state: State, batch: dict[str, torch.Tensor], job: Job, worker: Worker) -> float:
    """One optimiser step over grad_accum micro-batches; returns this worker's mean loss."""
    parts = micro_batches(to_device(batch, worker.device), job.train.grad_accum or 1)
    total = 0.0
    for i, part in enumerate(parts):
        with contextlib.nullcontext() if i == len(parts) - 1 else skip_grad_sync(state.net):
            with autocast_context(worker.device, precision(job, worker)):
                loss = stage.loss(state.net, part, SampleRng(part["seed"])) / len(parts)
            state.scaler.scale(loss).backward()
        total += float(loss.detach())
    state.scaler.unscale_(state.optimizer)
    if job.train.grad_clip > 0:  # over FSDP's DTensor gradients this norm is the global one too
        nn.utils.clip_grad_norm_(state.raw.parameters(), job.train.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    after_step(state.raw)
    state.step += 1
    state.ema.update(state.raw, state.step)
    return total


def open_tracker(job: Job, worker: Worker) -> Tracker:
    """Rank 0 reopens the stage's MLflow run (created by the driver); other ranks log nothing."""
    if worker.rank != 0 or job.run_id is None or job.tracking_uri is None:
        return NullTracker()
    tracker = MlflowTracker(job.tracking_uri, job.experiment)
    tracker.start(job.stage, resume_run_id=job.run_id)
    return tracker


class Progress:
    """Rank 0's running account: metrics at log steps, a line with the ETA, steady-state throughput."""

    def __init__(self, job: Job, tracker: Tracker, start_step: int, rank: int) -> None:
        self.job, self.tracker, self.start_step, self.rank = job, tracker, start_step, rank
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = start_step
        self.first: tuple[int, float] | None = None  # (step, time) after the first step: excludes warm-up

    def stepped(self, step: int) -> None:
        if self.first is None:
            self.first = (step, time.perf_counter())

    def log(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        sps = self.job.train.batch_size * (step - self.last_step) / max(now - self.last_t, 1e-9)
        eta = (now - self.t0) / (step - self.start_step) * (self.job.train.steps - step)
        self.last_t, self.last_step = now, step
        self.tracker.log_metrics({"loss": loss, "lr": lr, "samples_per_s": sps}, step)
        if self.rank == 0:  # to the process's own stdout: Ray Train's print patch would log it a second time
            print(f"[{self.job.stage}] step {step}/{self.job.train.steps} loss {loss:.4f} lr {lr:.2e} "
                  f"{sps:.1f} samples/s eta {eta:.0f}s", file=sys.__stdout__ or sys.stdout, flush=True)

    def throughput(self, step: int) -> float:
        """Samples/s from the end of the first step to `step` (0 when fewer than two steps ran)."""
        if self.first is None or step <= self.first[0]:
            return 0.0
        return self.job.train.batch_size * (step - self.first[0]) / (time.perf_counter() - self.first[1])


def tokenizer_for(stage: Stage):
    """open_clip's tokenizer for the stages that read captions (clip, prior), else None."""
    view = stage.spec.view(stage.cascade)
    if not (isinstance(view, ImageView) and view.tokens):
        return None
    import open_clip  # seconds to import: only the stages that read captions need it

    clip = stage.cascade.clip
    return open_clip.get_tokenizer(clip.model_name, context_length=clip.context_length)


def fps_schedule(cfg: StageTrainConfig) -> FpsSchedule:
    """The stage's clip fps schedule (video stages)."""
    return FpsSchedule(cfg.fps_min, cfg.fps_max, cfg.fps_mean[0], cfg.fps_mean[1])


def train_steps(job: Job, worker: Worker, stage: Stage, state: State, tracker: Tracker,
                progress: Progress) -> float:
    """From state.step to train.steps: log, preview and checkpoint on their cadences; returns the last loss."""
    cfg, loss = job.train, float("nan")
    batches = job_batches(job.stage, job.cascade, cfg, job.data, job.extra_data, rank=worker.rank,
                          world=worker.world, start_step=state.step, split=job.split, tokenizer=tokenizer_for(stage),
                          fps=fps_schedule(cfg), video_datasets=cfg.video_datasets,
                          loader_workers=cfg.loader_workers, pin_memory=worker.device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix=f"mav-{job.stage}-previews-") as previews:
        for batch in batches:
            step = state.step + 1
            maybe_fail(step, job.fail_at_step, job.run_root, job.stage, worker)
            loss = train_step(stage, state, batch, job, worker)
            progress.stepped(step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = global_mean(loss, worker)
                progress.log(step, loss, state.scheduler.get_last_lr()[0])
            if step % cfg.sample_every == 0:
                ema = state.ema.gathered(worker.rank)  # every rank joins the gather of a sharded EMA
                if worker.rank == 0:
                    with torch.no_grad():
                        preview = stage.spec.preview(stage, ema, to_device(batch, worker.device),
                                                     torch.Generator().manual_seed(cfg.seed))
                    write_preview(preview, Path(previews), tracker, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                report_checkpoint(job, worker, state, {"step": step, "loss": loss,
                                                       "samples_per_s": progress.throughput(step)})
            if step >= cfg.steps:
                return loss
    return loss


def run(job: Job, worker: Worker, tracker: Tracker | None = None) -> dict[str, float]:
    """Train `job.stage` to `train.steps`, resuming from the worker's checkpoint; returns final metrics.
    `tracker`: what rank 0 logs to instead of the job's MLflow run."""
    stage, state = build_state(job, worker)
    with worker.checkpoint() as path:
        if path is not None:
            saved_run = load_checkpoint(Path(path), state).get("mlflow_run_id")
            job.run_id = job.run_id or saved_run
    tracker = tracker if tracker is not None and worker.rank == 0 else open_tracker(job, worker)
    if state.step == 0:
        tracker.log_params({**job.resolved(), "worker": {"torch_threads": torch.get_num_threads()}})
    elif state.step < job.train.steps:  # a restart: MLflow shows where it resumed from
        tracker.log_metrics({"resumed_at_step": state.step}, state.step)
    progress, loss = Progress(job, tracker, state.step, worker.rank), float("nan")
    if state.step < job.train.steps:
        loss = train_steps(job, worker, stage, state, tracker, progress)
    return {"step": state.step, "loss": loss, "samples_per_s": progress.throughput(state.step)}
