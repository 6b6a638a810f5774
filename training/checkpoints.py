"""What the loop carries from step to step (`State`), and the checkpoint folder that saves it.

Checkpoint folder (every `checkpoint_every` steps and at the end, handed to the worker's `report`):
  weights.safetensors  the EMA weights (what sampling and the next stage use), config as metadata
  raw.safetensors      the trained weights the optimiser state belongs to
  optimizer.pt         optimiser + LR scheduler state (torch.save; loaded with weights_only=True)
  state.json           {"step", "mlflow_run_id", "config"}
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
from training.stages import weights_module
from training.workers import Worker


@dataclass
class State:
    """What the loop carries from step to step."""

    net: nn.Module  # as prepared (DDP on several workers)
    raw: nn.Module  # the unwrapped module
    ema: Ema
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0


def save_checkpoint(path: Path, job: Job, state: State) -> None:
    meta = {"config": job.resolved(), "stage": job.stage, "step": state.step}
    save_weights(weights_module(state.ema.module), path / "weights.safetensors", meta)
    save_weights(state.raw, path / "raw.safetensors", meta)
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"step": state.step, "mlflow_run_id": job.run_id,
                                                 "config": job.resolved()}))


def load_checkpoint(path: Path, state: State) -> dict[str, Any]:
    """Restore weights, EMA, optimiser, scheduler and step; returns state.json."""
    info = json.loads((path / "state.json").read_text())
    state.raw.load_state_dict(load_weights(path / "raw.safetensors")[0])
    weights_module(state.ema.module).load_state_dict(load_weights(path / "weights.safetensors")[0])
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state.optimizer.load_state_dict(opt["optimizer"])
    state.scheduler.load_state_dict(opt["scheduler"])
    state.scaler.load_state_dict(opt["scaler"])
    state.step = int(info["step"])
    return info


def report_checkpoint(job: Job, worker: Worker, state: State, metrics: dict[str, float]) -> None:
    """Rank 0 writes the checkpoint folder and reports it; every rank reports (it is a barrier)."""
    if worker.rank != 0:
        worker.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix=f"mav-{job.stage}-") as tmp:
        save_checkpoint(Path(tmp), job, state)
        worker.report(metrics, tmp)
