"""What the loop carries from step to step (`State`), and the checkpoint folder that saves it.

Checkpoint folder (every `checkpoint_every` steps and at the end, handed to the worker's `report`):
  weights.safetensors  the EMA weights (what sampling and the next stage use), config as metadata
  raw.safetensors      the trained weights the optimiser state belongs to
  optimizer.pt         optimiser + LR scheduler state (torch.save; loaded with weights_only=True)
  state.json           {"step", "mlflow_run_id", "config"}
The weights files hold full state dicts whatever the sharding: under FSDP every rank joins the gather and
rank 0 writes them, so the sampler and the next stage read them as they read a DDP run's. optimizer.pt
holds `optimizer.state_dict()` under DDP; under FSDP the full AdamW state keyed by parameter name
(`training.sharding.optimizer_state`, "sharding": "fsdp" beside it), which every rank loads whole and
keeps its slices of.
A restarted worker (FailureConfig) continues from the worker's checkpoint: the step counter goes on from
the checkpoint's step, and the tracker drops metrics at steps it already holds.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import load_weights, save_weights
from training.ema import Ema
from training.job import Job
from training.sharding import (full_state_dict, is_sharded, load_full_state_dict, load_optimizer_state,
                               optimizer_state)
from training.stages import weights_module
from training.workers import Worker


@dataclass
class State:
    """What the loop carries from step to step."""

    net: nn.Module  # as prepared (DDP on several workers; the FSDP2 module itself)
    raw: nn.Module  # the unwrapped module
    ema: Ema
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0


@dataclass
class Saved:
    """A checkpoint's contents as rank 0 writes them: full state dicts, gathered where sharded."""

    weights: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def gather(state: State, rank: int) -> Saved | None:
    """The checkpoint's contents on rank 0 (None elsewhere); under FSDP every rank must call it."""
    ema = state.ema.gathered(rank)
    raw = full_state_dict(state.raw)
    if is_sharded(state.raw):
        opt = {"optimizer": optimizer_state(state.raw, state.optimizer), "sharding": "fsdp"}
    else:
        opt = {"optimizer": state.optimizer.state_dict()}
    if rank != 0:
        return None
    return Saved(weights_module(ema).state_dict(), raw, opt)


def save_checkpoint(path: Path, job: Job, state: State, saved: Saved | None = None) -> None:
    """Write the folder (module doc); `saved` is `gather`'s result, required when the state is sharded."""
    saved = saved or gather(state, 0)
    meta = {"config": job.resolved(), "stage": job.stage, "step": state.step}
    save_weights(saved.weights, path / "weights.safetensors", meta)
    save_weights(saved.raw, path / "raw.safetensors", meta)
    torch.save({**saved.optimizer, "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"step": state.step, "mlflow_run_id": job.run_id,
                                                 "config": job.resolved()}))


def with_prefix(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights_module`'s state dict renamed to `module`'s (the clip stage saves the CLIP inside ClipModule)."""
    inner = weights_module(module)
    prefix = next(name for name, sub in module.named_modules() if sub is inner)
    return {f"{prefix}.{k}" if prefix else k: v for k, v in state.items()}


def load_checkpoint(path: Path, state: State) -> dict[str, Any]:
    """Restore weights, EMA, optimiser, scheduler and step; returns state.json. Every rank calls it."""
    info = json.loads((path / "state.json").read_text())
    load_full_state_dict(state.raw, load_weights(path / "raw.safetensors")[0])
    ema = with_prefix(state.ema.module, load_weights(path / "weights.safetensors")[0])
    load_full_state_dict(state.ema.module, ema)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if opt.get("sharding") == "fsdp":
        load_optimizer_state(state.raw, state.optimizer, opt["optimizer"])
    elif is_sharded(state.raw):
        raise ValueError(f"{path}: its optimiser state was saved unsharded; this run shards with FSDP")
    else:
        state.optimizer.load_state_dict(opt["optimizer"])
    state.scheduler.load_state_dict(opt["scheduler"])
    state.scaler.load_state_dict(opt["scaler"])
    state.step = int(info["step"])
    return info


def report_checkpoint(job: Job, worker: Worker, state: State, metrics: dict[str, float]) -> None:
    """Every rank joins the gather; rank 0 writes the checkpoint folder and reports it; every rank reports
    (it is a barrier)."""
    saved = gather(state, worker.rank)
    if worker.rank != 0:
        worker.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix=f"mav-{job.stage}-") as tmp:
        save_checkpoint(Path(tmp), job, state, saved)
        worker.report(metrics, tmp)
